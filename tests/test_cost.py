"""The cost model: N(T) against recorded expert counts under uniform routing, the profile's JSON round trip,
and predictions that must be monotone (more tokens or a larger budget never costs less; better acceptance never
emits fewer tokens). No timed assertions: measured times are only checked to be present and positive."""

from __future__ import annotations

import math

import pytest
import torch

import moe_spec_compile as msc
from moe_spec_compile.cost import CostModel, ModelShape, chain_tokens, distinct_experts, per_depth_acceptance

from moe_models import build


def uniform_router_model():
    """A config-built Qwen3-MoE whose routing is independent and uniform over experts: each router has
    orthogonal rows of equal norm (iid logits for isotropic inputs) and is sharp, and the attention and expert
    outputs are scaled down so the router inputs stay the (independent, random) token embeddings."""
    model, e, k = build("qwen3_moe", scale=1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight  # [E, H]
            q, _ = torch.linalg.qr(torch.randn(w.shape[1], w.shape[0], generator=g))
            w.copy_(q.T * 50)
            layer.self_attn.o_proj.weight.mul_(0.01)
            layer.mlp.experts.down_proj.mul_(0.01)
    return model, e, k


def test_distinct_experts_matches_recorded_counts_under_uniform_routing():
    model, e, k = uniform_router_model()
    compiled = torch.compile(model, backend="moespec", dynamic=False, options={"inner": "eager"})
    gen = torch.Generator().manual_seed(1)
    recorded = {}
    for t in (1, 2, 4, 8, 16):
        counts = []
        for _ in range(12):
            ids = torch.randperm(model.config.vocab_size, generator=gen)[:t][None]  # distinct tokens
            with torch.no_grad(), msc.record_experts() as rec:
                compiled(ids, use_cache=False)
            counts += [len(ev.experts) for ev in rec.events]
        x = torch.tensor(counts, dtype=torch.float64)
        mean, se = x.mean().item(), x.std().item() / math.sqrt(len(counts))
        expect = distinct_experts(t, e, k)
        assert abs(mean - expect) <= 4 * se + 0.15, (t, mean, se, expect)
        recorded[str(t)] = mean
    # recorded counts replace the formula inside their range, the formula holds outside it
    cm = CostModel(ModelShape(e, k, 2, 1000, 5000), bandwidth=1e9, expert_counts=recorded)
    assert cm.experts(4) == recorded["4"] and cm.experts(32) == pytest.approx(distinct_experts(32, e, k))
    assert cm.experts(16, budget=6) == 6 and cm.experts(1, budget=2) == k  # a budget never goes below k


def test_predictions_are_monotone():
    e, k = 64, 8
    cm = CostModel(ModelShape(e, k, 4, 2_000_000, 30_000_000), bandwidth=2e10)
    sizes = [1, 2, 4, 8, 16, 32, 64, 128]
    times = [cm.verify_time(n) for n in sizes]
    assert times == sorted(times) and times[-1] > times[0]
    assert [cm.experts(n) for n in sizes] == sorted(cm.experts(n) for n in sizes) and cm.experts(10**6) <= e
    budgets = [k, 12, 16, 32, e]
    by_c = [cm.verify_time(64, budget=c) for c in budgets]
    assert by_c == sorted(by_c) and cm.verify_time(64, budget=e) == pytest.approx(cm.verify_time(64))
    # batch: B rows of T tokens load N(B*T) experts, more rows never cost less
    assert [cm.verify_time(4, batch=b) for b in (1, 2, 8)] == sorted(cm.verify_time(4, batch=b) for b in (1, 2, 8))
    assert cm.experts(4, batch=8) == pytest.approx(distinct_experts(32, e, k))
    # acceptance: the chain law, increasing in alpha and depth
    assert chain_tokens(0.6, 4) == pytest.approx((1 - 0.6 ** 5) / (1 - 0.6))
    assert chain_tokens([1.0, 0.5], 3) == pytest.approx(1 + 1 + 0.5 + 0.25)
    tok = [cm.tokens_per_step(4, acceptance=a) for a in (0.0, 0.3, 0.6, 0.9, 1.0)]
    assert tok == sorted(tok) and tok[0] == 1 and tok[-1] == 5
    assert [chain_tokens(0.7, g) for g in range(6)] == sorted(chain_tokens(0.7, g) for g in range(6))
    # a budget makes the same tree cheaper, so at equal acceptance it is never slower
    assert cm.speedup(16, budget=16, acceptance=0.8) >= cm.speedup(16, acceptance=0.8)
    # a fit over measured buckets keeps non-negative coefficients: still monotone
    cm.verify = {"1,exact": 1.0e-3, "4,exact": 1.6e-3, "16,exact": 3.1e-3, "64,exact": 4.0e-3, "64,16": 2.5e-3}
    fit = [cm.verify_time(n, batch=2) for n in sizes]
    assert fit == sorted(fit) and cm.verify_time(16) == 3.1e-3
    # a size between measured ones (a chain of 4 runs 5 tokens) lies on the line between its neighbours
    assert cm.verify_time(5) == pytest.approx(1.6e-3 + (3.1e-3 - 1.6e-3) * (5 - 4) / (16 - 4))
    assert per_depth_acceptance([1, 2, 3, 3, 5], 4) == [0.8, 0.75, 1 / 3, 1.0]


def test_profile_round_trip(tmp_path):
    target = build("qwen3_moe")[0]
    cm = msc.profile(target, msc.NgramDrafter(), trees=(0, 2), sizes=(1, 4), new_tokens=8, repeats=1,
                     prompts=[torch.tensor([3, 4, 5, 3, 4, 5, 3, 4, 5, 6])])
    # sizes asked for, and chain 2's own pass size (3 tokens: decoding verifies it at that size)
    assert set(cm.verify) == {"1,exact", "3,exact", "4,exact"} and all(t > 0 for t in cm.verify.values())
    assert set(cm.expert_counts) == {"1", "3", "4"} and cm.expert_counts["1"] == cm.model.top_k
    assert cm.ar_step > 0 and set(cm.measured) == {"ar,exact", "chain2,exact"}
    assert cm.measured["ar,exact"]["speedup"] == pytest.approx(1.0)
    assert "|cpu" in cm.key and cm.key.endswith("|float32")
    path = tmp_path / "profile.json"
    cm.save(path)
    other = CostModel.analytic(build("qwen3_moe", seed=0)[0].half(), bandwidth=1e9)  # another dtype: another key
    other.save(path)
    back = CostModel.load(path, target)
    assert back.to_dict() == cm.to_dict() and back.speedup(2) == cm.speedup(2)
    with pytest.raises(KeyError, match="moespec profile"):
        CostModel.load(path, key="nope")
