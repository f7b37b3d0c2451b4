"""The cost model: N(T) against recorded expert counts under uniform routing, the profile's JSON round trip,
and predictions that must be monotone (more tokens or a larger budget never costs less; better acceptance never
emits fewer tokens); the closed forms (break-even acceptance, best chain length) against bisection and direct
search over the model's own speedup. No timed assertions: measured times are only checked to be present and
positive."""

from __future__ import annotations

import math

import pytest
import torch

import moe_spec_compile as msc
from moe_spec_compile.commands.profile import format_profile
from moe_spec_compile.cost import (
    CostModel,
    ModelShape,
    _chain_law,
    chain_acceptance,
    chain_tokens,
    distinct_experts,
    per_depth_acceptance,
)
from moe_spec_compile.speculative import TreeSpec

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


# --- closed forms: break-even acceptance and best chain length ---------------------------------------

def analytic_model(**kw) -> CostModel:
    """64 experts top-8, 4 MoE layers of 2 MB experts, 100 MB dense, 20 GB/s, 0.2 ms of drafting per level: the
    step time is concave in the pass size (N(T) saturates)."""
    return CostModel(ModelShape(64, 8, 4, 2_000_000, 100_000_000), **{"bandwidth": 2e10, "draft_level": 2e-4} | kw)


def linear_model() -> CostModel:
    """Step time linear in the chain length K: verify 1 ms + 0.2 ms per token, measured at every size; 0.1 ms of
    drafting per level, so step_time(K) = 1.2 ms + 0.3 ms * K."""
    return CostModel(ModelShape(64, 8, 4, 2_000_000, 100_000_000), draft_level=1e-4,
                     verify={f"{n},exact": 1e-3 + 2e-4 * n for n in range(1, 40)})


def bisect(f, lo=0.0, hi=1.0) -> float:
    """The root of an increasing f on [lo, hi]: the plain reference, no sympy."""
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def test_chain_law_is_chain_tokens():
    import sympy

    a, k = sympy.Symbol("a"), sympy.Symbol("K")
    for n in range(9):
        poly, geometric = _chain_law(a, n), _chain_law(a, k)  # the polynomial, and the closed form for real K
        for alpha in (0.0, 0.3, 0.77, 1.0):
            assert float(poly.subs(a, alpha)) == pytest.approx(chain_tokens(alpha, n), rel=1e-12)
            if alpha != 1.0:
                assert float(geometric.subs({a: alpha, k: n})) == pytest.approx(chain_tokens(alpha, n), rel=1e-12)
    # chain_acceptance inverts chain_tokens; its limits: 1 token at any alpha, drafted + 1 only at alpha = 1
    for n in (1, 2, 5, 16):
        for alpha in (0.05, 0.5, 0.9, 0.999):
            assert chain_acceptance(chain_tokens(alpha, n), n) == pytest.approx(alpha, abs=1e-12)
        assert chain_acceptance(n + 1, n) == 1.0 and chain_acceptance(n + 1.001, n) is None
        assert chain_acceptance(1.0, n) == 0.0 and chain_acceptance(0.5, n) == 0.0


@pytest.mark.parametrize("budget", [None, 16], ids=["exact", "C16"])
@pytest.mark.parametrize("shape", [2, 4, 8, TreeSpec(16, 4, 4)], ids=["chain2", "chain4", "chain8", "tree16-4-4"])
def test_break_even_acceptance_is_where_speedup_is_one(shape, budget):
    cm = analytic_model(accepted={"tree16-4-4": 3.9})  # a measured length: acceptance= overrides it
    star = cm.break_even_acceptance(shape, budget)
    assert 0 < star < 1
    assert cm.speedup(shape, budget, acceptance=star) == pytest.approx(1.0, abs=1e-6)
    assert star == pytest.approx(bisect(lambda a: cm.speedup(shape, budget, acceptance=a) - 1), abs=1e-9)


def test_break_even_acceptance_limits_and_budget():
    cm = analytic_model()
    # drafting costs more than a chain can win back: not even alpha = 1 breaks even
    slow = analytic_model(draft_level=0.05)
    assert slow.break_even_acceptance(4) is None and slow.speedup(4, acceptance=1.0) < 1
    # a step no slower than the AR step: pays at any acceptance
    fast = analytic_model(ar_step=1.0)
    assert fast.break_even_acceptance(4) == 0.0 and fast.speedup(4, acceptance=0.0) >= 1
    assert cm.break_even_acceptance(0) == 0.0  # AR against itself
    # batch: the same law against the same batch's AR step
    star = cm.break_even_acceptance(4, batch=4)
    assert cm.speedup(4, batch=4, acceptance=star) == pytest.approx(1.0, abs=1e-6)
    # more bytes per step never lowers the acceptance needed (None: unreachable, above every number)
    stars = [cm.break_even_acceptance(8, c) for c in (8, 12, 16, 24, 32, 48, 64, None)]
    stars = [2.0 if s is None else s for s in stars]
    assert stars == sorted(stars) and stars[0] < stars[-1]


def test_best_chain_length_matches_direct_search_and_closed_form():
    lin = linear_model()
    t = lambda x: 1.2e-3 + 3e-4 * x  # lin's step time, written out
    assert [lin.step_time(n) for n in range(18)] == pytest.approx([t(n) for n in range(18)], rel=1e-12)
    ks, stars = [], []
    for a in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        k, k_star = lin.best_chain_length(acceptance=a)
        assert k == max(range(1, 17), key=lambda n: lin.speedup(n, acceptance=a))
        assert abs(k_star - k) <= 1  # step time linear in K: k is K* rounded down or up
        # K* maximizes the continuous speedup (the right LambertW branch): a grid over [0, 30]
        s = lambda x, a=a: (1 - a ** (x + 1)) / (1 - a) / t(x)
        grid = max((i / 100 for i in range(3001)), key=s)
        assert k_star == pytest.approx(grid, abs=0.01)
        ks.append(k)
        stars.append(k_star)
    assert ks == sorted(ks) and stars == sorted(stars) and ks[0] < ks[-1]  # better acceptance: never shorter
    assert lin.best_chain_length(acceptance=1.0) == (16, None)  # every token accepted: longer always wins
    assert lin.best_chain_length(acceptance=0.99, max_len=4)[0] == 4
    # a concave step time, the model's own per-depth alphas, a budget: the integer is still the direct argmax
    cm = analytic_model(alphas=[0.9, 0.8, 0.7])
    for budget, acceptance in ((None, None), (16, None), (16, 0.85)):
        k, k_star = cm.best_chain_length(budget, acceptance)
        assert k == max(range(1, 17), key=lambda n: cm.speedup(n, budget, acceptance=acceptance))
        assert k_star is None or k_star > 0


def test_format_profile_prints_the_closed_forms():
    cm = analytic_model(key="m", ar_step=8.2e-3, alphas=[0.8, 0.7])
    row = {"tokens_per_step": 2.5, "step_s": 1e-3, "predicted_step_s": 1e-3, "speedup": 1.2, "predicted_speedup": 1.1}
    cm.measured = {"ar,exact": row, "chain4,exact": row, "tree16-4-4,16": row, "static3,exact": row}
    out = format_profile(cm).splitlines()
    star = cm.break_even_acceptance(4)
    assert (f"break-even acceptance: chain4, C=exact: alpha* = {star:.2f} (measured per-depth acceptance "
            f"{chain_acceptance(2.5, 4):.2f})") in out
    assert sum(line.startswith("break-even acceptance: ") for line in out) == 2  # chain4 and tree16-4-4
    k, k_star = cm.best_chain_length()
    assert out[-1].startswith(f"best chain length: K = {k} (continuous optimum K* = ")
