"""The moespec backend on every covered family and experts implementation (CPU, fp32, tiny configs).

(a) budget None == eager model; (b) budgets k+1 and E/2 on 8- and 48-token passes: at most C experts
per recorded execution, logits == the plain-PyTorch reference of the budget semantics, both policies;
(c) a prefill longer than max_budget_tokens is exact; (d) explain() counts every MoE layer.
"""

from __future__ import annotations

import pytest
import torch

import moe_spec_compile as msc

from moe_models import ALL_CASES, build
from reference import reference_budget

# Experts that moespec replaces with fused_experts; "eager" breaks the graph: routing only.
EXPECT_FUSED = {"grouped_mm": True, "batched_mm": True, "eager": False, "plain": True}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits if hasattr(model, "config") else model(ids).logits


def _close(a, b, rtol=1e-5):
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= rtol * scale, (a - b).abs().max().item()


@pytest.mark.parametrize("family,impl", ALL_CASES, ids=[f"{f}-{i}" for f, i in ALL_CASES])
def test_family(family, impl):
    torch._dynamo.reset()
    model, e, k = build(family, impl)
    gen = torch.Generator().manual_seed(1)
    short = torch.randint(0, 96, (1, 8), generator=gen)
    long = torch.randint(0, 96, (1, 48), generator=gen)
    prefill = torch.randint(0, 96, (1, 80), generator=gen)
    compiled = torch.compile(model, backend="moespec",
                             options={"budget": k + 1, "inner": "eager", "max_budget_tokens": 64})

    # (b) compile-time budget k+1, substitute, 8 tokens
    with msc.record_experts() as rec:
        got = _logits(compiled, short)
    with reference_budget(model, k + 1, "substitute"):
        want = _logits(model, short)
    _close(got, want, 1e-4)
    assert rec.events and all(len(ev.experts) <= k + 1 and ev.budget == k + 1 for ev in rec.events)
    assert len({ev.block for ev in rec.events}) == 2  # both MoE layers, each by its own name

    # (b) run-time overrides: both policies, budgets k+1 and E/2, 48 tokens
    for c in (k + 1, e // 2):
        for policy in ("substitute", "truncate"):
            with msc.budget(c, policy=policy), msc.record_experts() as rec:
                got = _logits(compiled, long)
            with reference_budget(model, c, policy):
                want = _logits(model, long)
            _close(got, want, 1e-4)
            assert len(rec.events) == 2 and max(len(ev.experts) for ev in rec.events) <= c

    # (a) no budget: exact
    exact = _logits(model, long)
    with msc.budget(None):
        _close(_logits(compiled, long), exact)
    # C >= E is exact too
    with msc.budget(e + 5):
        _close(_logits(compiled, long), exact)
    # (c) a prefill longer than max_budget_tokens stays exact
    with msc.record_experts() as rec:
        _close(_logits(compiled, prefill), _logits(model, prefill))
    assert all(ev.budget is None for ev in rec.events)

    # (d) explain counts every MoE layer; the experts are fused where the graph holds them
    report = msc.explain(model, long)
    moe = [b for b in report.blocks if b.rewritten]
    assert len(moe) == 2, report
    assert all(b.num_experts == e and b.top_k == k for b in moe)
    fused = ["fused_experts" in b.experts for b in moe]
    assert all(fused) if EXPECT_FUSED[impl] else not any(fused), report
