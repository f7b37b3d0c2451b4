"""msc.explain leaves the caller's compiles alone (issue 10 item 4): calling it more often than dynamo's recompile
limit neither empties its own reports nor makes a later budgeted torch.compile of the same model class fall back
to eager (unbudgeted) without a word."""

from __future__ import annotations

import importlib

import pytest
import torch

import moe_spec_compile as msc

from moe_models import build

explain_mod = importlib.import_module("moe_spec_compile.explain")

LIMIT = 2  # a small recompile limit stands in for dynamo's default 8 (same mechanism, fewer compiles)


def _limit_name():
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def _budgeted_run(model, ids, c):
    compiled = torch.compile(model, backend="moespec", options={"budget": c, "inner": "eager"})
    with msc.record_experts() as rec, torch.no_grad():
        out = compiled(ids, use_cache=False).logits
    return out, rec.events


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated-region", "older-torch-fallback"])
def test_many_explains_then_budgeted_compile(isolate, monkeypatch):
    if isolate and not explain_mod._ISOLATE:
        pytest.skip("this torch has no isolate_recompiles")
    monkeypatch.setattr(explain_mod, "_ISOLATE", isolate)
    torch._dynamo.reset()
    model, e, k = build("qwen3_moe", seed=1)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    c = k  # the smallest budget that is allowed, well below E
    assert c < e
    with torch._dynamo.config.patch(**{_limit_name(): LIMIT}):
        for _ in range(LIMIT + 2):
            report = msc.explain(model, ids, use_cache=False)
            assert len(report.blocks) == model.config.num_hidden_layers
            assert all(b.rewritten for b in report.blocks)
        _, events = _budgeted_run(model, ids, c)
    assert len(events) == model.config.num_hidden_layers, "the budgeted compile ran eagerly (no moespec events)"
    assert all(ev.budget == c and len(ev.experts) <= c for ev in events)
    with msc.record_experts() as rec, torch.no_grad():
        model(ids, use_cache=False)
    assert not rec.events  # the eager model itself is untouched


def test_explain_after_the_callers_compiles_keeps_them(request):
    """The caller's graph, compiled before explain, still serves afterwards without recompiling, and explain
    still reports every block although the caller's entries are there."""
    torch._dynamo.reset()
    model, e, k = build("olmoe", seed=2)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(1))
    limit = torch._dynamo.config.patch(**{_limit_name(): LIMIT})
    limit.__enter__()
    request.addfinalizer(lambda: limit.__exit__(None, None, None))
    compiled = torch.compile(model, backend="moespec", options={"budget": k, "inner": "eager"})
    with torch.no_grad():
        first = compiled(ids, use_cache=False).logits
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(LIMIT + 1):
        assert len(msc.explain(model, ids, use_cache=False).blocks) == model.config.num_hidden_layers
    frames_after_explain = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames_after_explain > frames  # explain compiled its own graphs ...
    with msc.record_experts() as rec, torch.no_grad():
        again = compiled(ids, use_cache=False).logits
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_after_explain  # ... the caller's reused
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert rec.events and all(len(ev.experts) <= k for ev in rec.events)
