"""Budgets as data: per-layer and coverage budgets, scores, switching budgets on one compiled graph, statistics
kept in device counters, nested recorders (CPU; the CUDA-graph replay test is in test_speculative_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import moe_spec_compile as msc
from moe_spec_compile.budget import register_spec

from moe_models import VOCAB, build
from reference import budget_mask, reference_budget


def _close(a, b, tol=1e-4):
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item()


def _ids(n, seed=0):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def qwen():
    torch._dynamo.reset()
    model, e, k = build("qwen3_moe", "grouped_mm")
    return model, torch.compile(model, backend="moespec", options={"inner": "eager"}), e, k


def _run(compiled, x, c=None, **kw):
    with torch.no_grad(), msc.budget(c, **kw), msc.record_experts() as rec:
        out = compiled(x, use_cache=False).logits
    return out, {ev.block: len(ev.experts) for ev in rec.events}


@pytest.mark.parametrize("c", [[5, 9], {"model.layers.1.mlp": 6},
                               {"model.layers.0.mlp": 7, "model.layers.1.mlp": None}])
def test_per_layer_budgets_bind_per_layer(qwen, c):
    model, e = qwen[0], qwen[2]
    x = _ids(24)
    got, used = _run(qwen[1], x, c)
    with torch.no_grad(), reference_budget(model, c, "substitute"):
        want = model(x, use_cache=False).logits
    _close(got, want)
    caps = c if isinstance(c, list) else [c.get("model.layers.0.mlp"), c.get("model.layers.1.mlp")]
    for layer, cap in enumerate(caps):
        n = used[f"model.layers.{layer}.mlp"]
        assert n <= (cap or e)
    assert used["model.layers.0.mlp"] != used["model.layers.1.mlp"] or isinstance(c, dict)


def test_list_budgets_bind_by_each_models_own_layer_order():
    """Entry i of a list budget is the i-th MoE block of the model it runs on, whatever ran before it in the process
    (another model's blocks once took ranks 0 and 1, so a list then bound nothing here)."""
    torch._dynamo.reset()
    other, _, _ = build("gpt_fast", "plain", seed=3)  # other block names, seen first
    with torch.no_grad(), msc.budget([5, 9]):
        torch.compile(other, backend="moespec", options={"inner": "eager"})(_ids(8))
    model, e, _ = build("qwen3_moe", "grouped_mm", seed=4)
    compiled = torch.compile(model, backend="moespec", options={"inner": "eager"})
    x = _ids(24, seed=5)
    exact, wide = _run(compiled, x)
    got, used = _run(compiled, x, [5, 9])
    with torch.no_grad(), reference_budget(model, [5, 9], "substitute"):
        want = model(x, use_cache=False).logits
    _close(got, want)
    assert min(wide.values()) > 9 and (got - exact).abs().max() > 1e-3  # the caps bind on this pass
    assert used == {"model.layers.0.mlp": 5, "model.layers.1.mlp": 9}


def test_coverage_budgets_bind_and_grow_with_share(qwen):
    model, compiled, e, k = qwen
    x = _ids(32, seed=2)
    exact, _ = _run(compiled, x, None)
    sizes = []
    for share in (0.3, 0.6, 0.9):
        _, used = _run(compiled, x, msc.Coverage(share))
        sizes.append(sum(used.values()))
        assert all(k <= n < e for n in used.values())
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    _, capped = _run(compiled, x, msc.Coverage(0.9, max_budget=k + 1))
    assert max(capped.values()) <= k + 1
    full, _ = _run(compiled, x, msc.Coverage(1.0))
    _close(full, exact, 1e-6)
    big, _ = _run(compiled, x, e + 3)
    _close(big, exact, 1e-6)
    with pytest.raises(ValueError, match="share"):
        msc.Coverage(1.5)


@pytest.mark.parametrize("score", ["topk", "top1"])
def test_scores_against_the_plain_reference(qwen, score):
    model, compiled, e, k = qwen
    x = _ids(24, seed=3)
    for c in (k + 1, e // 2):
        got, used = _run(compiled, x, c, score=score)
        with torch.no_grad(), reference_budget(model, c, "substitute", score=score):
            want = model(x, use_cache=False).logits
        _close(got, want)
        assert max(used.values()) <= c


def test_budget_mask_reference_scores():
    """The reference itself: top1 puts every token's first choice in A when C allows; topk ignores the tail."""
    probs = torch.tensor([[0.4, 0.35, 0.25, 0.0], [0.0, 0.35, 0.25, 0.4], [0.0, 0.35, 0.25, 0.4]])
    # sums: .4 1.05 .75 .8; each token's top-1: e0, e3, e3
    assert budget_mask(probs, 2, "prob").tolist() == [False, True, False, True]
    assert budget_mask(probs, 2, "topk", probs, 1).tolist() == [True, False, False, True]
    assert budget_mask(probs, 2, "top1", probs, 1).tolist() == [True, False, False, True]
    assert budget_mask(probs, 3, "top1", probs, 1).tolist() == [True, True, False, True]


def test_one_compiled_graph_serves_every_budget():
    """Default inductor path: budgets None, 8, 5, per-layer, coverage in turn; no recompile, each one binds."""
    torch._dynamo.reset()
    model, e, k = build("olmoe", "grouped_mm")
    compiled = torch.compile(model, backend="moespec")
    x = _ids(20, seed=4)
    with torch.no_grad():
        compiled(x, use_cache=False)
        frames = counters["stats"]["unique_graphs"]
        for c in (None, 8, 5, [6, 9], msc.Coverage(0.5), None):
            got, used = _run(compiled, x, c)
            if isinstance(c, int):
                with reference_budget(model, c, "substitute"):
                    _close(got, model(x, use_cache=False).logits)
                assert max(used.values()) <= c
            if c is None:
                _close(got, model(x, use_cache=False).logits)
    assert counters["stats"]["unique_graphs"] == frames


def test_device_counters_and_nested_recorders(qwen):
    model, compiled, e, k = qwen
    msc.reset_expert_stats()
    x = _ids(16, seed=5)
    with msc.record_experts() as outer:
        with msc.record_experts() as inner:  # raised ValueError: list.remove(x) before
            _run(compiled, x, 6)
        _run(compiled, x, None)
    assert len(inner.events) == 2 and len(outer.events) == 4  # each run: one event per block
    summary = outer.summary()
    assert summary["executions"] == 4 and set(summary["by_block"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert summary["by_block"]["model.layers.0.mlp"]["budgets"] == [None, 6]
    assert "model.layers.1.mlp" in str(outer)
    stats = msc.expert_stats()
    assert set(stats) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    for s in stats.values():
        assert s["passes"] == 2 and s["tokens"] == 32
        assert k <= s["experts_per_pass"] <= (6 + e) / 2
        assert 0 <= s["bound_share"] <= 0.5


def test_token_weights_exclude_tokens_from_the_scores(qwen):
    """msc.token_weights (the decoder's draft-tree node weights): a token of weight 0 does not vote."""
    model, compiled, e, k = qwen
    x = _ids(12, seed=6)
    y = x.clone()
    y[0, -1] = (x[0, -1] + 7) % VOCAB  # only the last token differs
    w = torch.ones(12)
    w[-1] = 0
    with msc.token_weights(w):
        a, _ = _run(compiled, x, k + 1)
        b, _ = _run(compiled, y, k + 1)
    _close(a[0, :-1], b[0, :-1], 1e-5)
    with pytest.raises(ValueError, match="1-D"):
        with msc.token_weights(torch.ones(2, 2)):
            pass


def test_budget_specs_are_validated():
    for bad in (0, -2, 2.5, "8", {3: 4}, [1, 0], {"a": 0}):
        with pytest.raises(ValueError, match="budget"):
            register_spec(bad)
    with pytest.raises(Exception, match="budget"):  # dynamo wraps backend errors; the message names the option
        torch.compile(torch.nn.Linear(2, 2), backend="moespec", options={"budget": [0]})(torch.randn(1, 2))


def test_routing_ops_carry_no_names_or_router_weights():
    """Telemetry is out of the compute path: the ops take the routing data, the budget spec id and a site number."""
    topk = [a.name for a in torch.ops.moespec.budget_topk.default._schema.arguments]
    apply = [a.name for a in torch.ops.moespec.budget_apply.default._schema.arguments]
    assert topk == ["x", "scores", "k", "score_fn", "spec", "policy", "max_tokens", "sorted", "token_mask", "site",
                    "score"]
    assert apply == ["ids", "weights", "keep", "to_empty", "site"]


def test_per_layer_names_without_a_heap_scan(monkeypatch):
    """Two instances of a graph-broken model share dynamo's graphs; each layer still gets its own budget and its
    own name in events, and naming never scans the heap (gc.get_objects)."""
    import gc

    def refuse():
        raise AssertionError("naming scanned gc.get_objects()")

    monkeypatch.setattr(gc, "get_objects", refuse)
    torch._dynamo.reset()
    c = {"model.layers.0.mlp": 4, "model.layers.1.mlp": None}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, e, k = build("qwen3_moe", "eager")  # its experts loop breaks the graph: one graph, every layer
        compiled = torch.compile(model, backend="moespec")
        x = _ids(24, seed=seed)
        with msc.record_experts() as rec:
            got, used = _run(compiled, x, c)
        assert {ev.compiled_as for ev in rec.events} == {"model.layers.0.mlp"}  # the graph is shared
        with torch.no_grad(), reference_budget(model, c, "substitute"):
            want = model(x, use_cache=False).logits
        _close(got, want)
        assert set(used) == {"model.layers.0.mlp", "model.layers.1.mlp"}
        assert used["model.layers.0.mlp"] <= 4 < used["model.layers.1.mlp"]
