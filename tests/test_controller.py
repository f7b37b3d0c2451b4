"""The oracle drafter, budgets that cannot bind, and the controller (tree="auto", budget="auto") against the
target's own greedy decoding. Target: a tiny random Qwen3-MoE (tests/moe_models.py)."""

from __future__ import annotations

import pytest
import torch

import moe_spec_compile as msc
from moe_spec_compile.speculative.tree import TreeSpec

from moe_models import build

PROMPT = torch.tensor([[5, 17, 33, 2, 90, 41, 8]])


@pytest.fixture(scope="module")
def target():
    return build("qwen3_moe")[0]


def reference(model, prompt, n):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0].tolist()


@pytest.mark.parametrize("tree", [4, TreeSpec(8, 3, 3)], ids=["chain4", "tree8"])
def test_oracle_at_acceptance_one_accepts_every_draft(target, tree):
    oracle = msc.OracleDrafter(target, acceptance=1.0)
    dec = msc.SpeculativeDecoder(target, drafter=oracle, tree=tree)
    out = dec.generate(PROMPT, max_new_tokens=21, eos_token_id=None)
    assert out.sequences[0].tolist() == reference(target, PROMPT, 21)
    depth = min(dec.tree.depth, dec.tree.max_nodes)
    assert out.stats.accepted_per_step[:-1] == [depth + 1] * (len(out.stats.accepted_per_step) - 1)
    assert all(v.tree_size == dec.tree.max_nodes + 1 for v in out.stats.verify)  # the shape's size, filled


def test_oracle_partial_acceptance_stays_exact(target):
    rates = []
    for a in (0.0, 0.5):
        oracle = msc.OracleDrafter(target, acceptance=a, seed=3)
        oracle.precompute([PROMPT], 30)
        out = msc.SpeculativeDecoder(target, drafter=oracle, tree=4).generate(PROMPT, max_new_tokens=30,
                                                                            eos_token_id=None)
        assert out.sequences[0].tolist() == reference(target, PROMPT, 30)
        rates.append(out.stats.tokens_per_step)
    assert rates[0] == 1.0 and 1.2 < rates[1] < 3.0  # 0.5: 1 + .5 + .25 + ... ~ 1.9
    with pytest.raises(ValueError, match="acceptance"):
        msc.OracleDrafter(target, acceptance=1.5)


def test_budget_without_moespec_target_is_refused(target):
    with pytest.raises(ValueError, match="compile=True"):
        msc.SpeculativeDecoder(target, tree=2, budget=4)
    dec = msc.SpeculativeDecoder(target, tree=2)
    with pytest.raises(ValueError, match="backend=\"moespec\""):
        dec.generate(PROMPT, max_new_tokens=4, budget=4)
    with pytest.raises(ValueError, match="compile=True"):
        msc.SpeculativeDecoder(torch.compile(target, backend="eager"), tree=2, budget=lambda step: 4)
    # compiled by the caller with the moespec backend: the budget binds, and is taken
    own = torch.compile(target, backend="moespec", dynamic=False, options={"inner": "eager", "max_budget_tokens": None})
    out = msc.SpeculativeDecoder(own, tree=2, budget=4).generate(PROMPT, max_new_tokens=6, eos_token_id=None)
    assert {c for _, c in out.stats.buckets} == {4}
    assert all(max(v.experts_per_layer.values()) <= 4 for v in out.stats.verify)
