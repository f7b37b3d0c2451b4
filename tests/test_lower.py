"""The lowered inductor graph (passes/lower.py): on the CPU the routing ops and small experts run as plain tensor
code traced into the pass. Equal to the ops (run eagerly) and to the plain-PyTorch reference under every kind of
budget, the same device counters, no moespec op called on the way; the host's parts (recorded events, other
policies at run time) still work."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import moe_spec_compile as msc
from moe_spec_compile.budget import expert_stats, reset_expert_stats

from moe_models import VOCAB, build
from reference import reference_budget


def _close(a, b, tol=1e-4):
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item()


@pytest.fixture(scope="module")
def qwen():
    torch._dynamo.reset()
    model, e, k = build("qwen3_moe", "grouped_mm")
    opts = {"max_budget_tokens": None}
    lowered = torch.compile(model, backend="moespec", dynamic=False, options=opts)
    with_ops = torch.compile(model, backend="moespec", dynamic=False, options={**opts, "inner": "eager"})
    return model, lowered, with_ops, e, k


def _ids(n, seed=0):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _moespec_ops_called(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("moespec::")}


@pytest.mark.parametrize("c", [None, 5, [4, 7], msc.Coverage(0.6)], ids=["exact", "c5", "list", "coverage"])
@pytest.mark.parametrize("n", [8, 12])
def test_lowered_graph_equals_the_ops_and_calls_none(qwen, c, n):
    """8 tokens x top-4 = 32 slots over 16 experts: the experts are traced in too (experts_op.in_graph_pays); at 12
    tokens they stay the op."""
    model, lowered, with_ops, e, _k = qwen
    x = _ids(n, seed=1)
    with torch.no_grad(), msc.budget(c):
        lowered(x, use_cache=False)  # compiles (the profile below sees one steady call)
        reset_expert_stats()
        called = _moespec_ops_called(lambda: lowered(x, use_cache=False))
        got = lowered(x, use_cache=False).logits
        counted = expert_stats()
        reset_expert_stats()
        want = with_ops(x, use_cache=False).logits
        want = with_ops(x, use_cache=False).logits
        counted_ops = expert_stats()
    assert called == (set() if n == 8 else {"moespec::fused_experts"}), called  # the routing ops: traced in
    _close(got, want)
    if not isinstance(c, msc.Coverage):
        with torch.no_grad(), reference_budget(model, c, "substitute"):
            _close(got, model(x, use_cache=False).logits)
    assert counted == counted_ops and counted  # two passes each: the same device counters
    loads = [s["experts_per_pass"] for s in counted.values()]
    if isinstance(c, int):
        assert max(loads) <= c
    elif isinstance(c, list):
        assert loads[0] <= 4 and loads[1] <= 7


def test_the_hosts_parts_run_the_ops(qwen):
    """Recorded events need the ops (the ids reach the host); a policy other than the one the graph was traced under
    runs the ops too, and equals the reference under that policy."""
    model, lowered, _with_ops, _e, _k = qwen
    x = _ids(10, seed=2)
    with torch.no_grad(), msc.budget(5):
        lowered(x, use_cache=False)
        with msc.record_experts() as rec:
            got = lowered(x, use_cache=False).logits
    assert [len(ev.experts) <= 5 and ev.budget == 5 for ev in rec.events] == [True, True]
    with torch.no_grad(), reference_budget(model, 5, "substitute"):
        _close(got, model(x, use_cache=False).logits)
    with torch.no_grad(), msc.budget(5, policy="truncate"):
        got = lowered(x, use_cache=False).logits
    with torch.no_grad(), reference_budget(model, 5, "truncate"):
        _close(got, model(x, use_cache=False).logits)


def test_slots_follow_the_model_that_runs():
    """Two instances share one compiled code: each call's slots (its own blocks' budgets) reach the lowered graph."""
    torch._dynamo.reset()
    a, _e, _k = build("qwen3_moe", "grouped_mm", seed=0)
    b, _e, _k = build("qwen3_moe", "grouped_mm", seed=4)
    x = _ids(12, seed=3)
    budget = {"model.layers.0.mlp": 4, "model.layers.1.mlp": 7}
    ca = torch.compile(a, backend="moespec", dynamic=False, options={"max_budget_tokens": None})
    cb = torch.compile(b, backend="moespec", dynamic=False, options={"max_budget_tokens": None})
    with torch.no_grad(), msc.budget(budget):
        for model, compiled in ((a, ca), (b, cb), (a, ca)):
            got = compiled(x, use_cache=False).logits
            with reference_budget(model, budget, "substitute"):
                _close(got, model(x, use_cache=False).logits)


def test_a_lowering_that_fails_runs_the_ops(monkeypatch):
    """Where the lowered graph does not build or compile (another torch, say), the graph runs the ops: a warning,
    and the same results."""
    import moe_spec_compile.passes.lower as lower

    def broken(*args, **kwargs):
        raise RuntimeError("no lowering here")

    monkeypatch.setattr(lower, "select_in_graph", broken)
    torch._dynamo.reset()
    model, _e, _k = build("qwen3_moe", "grouped_mm", seed=5)
    compiled = torch.compile(model, backend="moespec", dynamic=False, options={"max_budget_tokens": None})
    x = _ids(8, seed=6)
    with torch.no_grad(), msc.budget(5):
        with pytest.warns(RuntimeWarning, match="lowered graph did not compile"):
            got = compiled(x, use_cache=False).logits
        called = _moespec_ops_called(lambda: compiled(x, use_cache=False))
    assert "moespec::budget_topk" in called
    with torch.no_grad(), reference_budget(model, 5, "substitute"):
        _close(got, model(x, use_cache=False).logits)


def test_a_padded_batch_votes_without_its_padding(qwen):
    """Two rows, the second left-padded: the lowered graph reads the attention mask (padding does not vote for the
    budget set) as the ops do; the real positions' logits equal the ops', the padding changes the budget set of
    neither."""
    _model, lowered, with_ops, _e, _k = qwen
    x = torch.cat([_ids(4, seed=7), _ids(4, seed=8)])
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    with torch.no_grad(), msc.budget(5):
        lowered(x, attention_mask=mask, use_cache=False)
        called = _moespec_ops_called(lambda: lowered(x, attention_mask=mask, use_cache=False))
        got = lowered(x, attention_mask=mask, use_cache=False).logits
        want = with_ops(x, attention_mask=mask, use_cache=False).logits
        x_other = x.clone()
        x_other[1, :2] = (x[1, :2] + 11) % VOCAB  # other tokens under the padding
        other = lowered(x_other, attention_mask=mask, use_cache=False).logits
    assert called == set(), called
    real = mask.bool()
    _close(got[real], want[real])
    _close(other[real], got[real])
