"""The backend's public surface: options and their errors, warnings, counters, dynamic shapes, the
entry point, and routers it must leave alone."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import moe_spec_compile as msc
from moe_spec_compile.backend import parse_options

from moe_models import GptFastMoE, TinyLM, build


@pytest.mark.parametrize("options,needle", [
    ({"budget": 0}, "budget"), ({"budget": -3}, "budget"), ({"budget": 2.5}, "budget"), ({"budget": True}, "budget"),
    ({"policy": "drop"}, "policy"), ({"bogus": 1}, "bogus"), ({"inner": "tvm"}, "inner"),
    ({"kernels": "cuda"}, "kernels"), ({"max_budget_tokens": 0}, "max_budget_tokens"),
])
def test_bad_options_raise_naming_the_option(options, needle):
    with pytest.raises(ValueError, match=needle):
        parse_options(options)
    model, _, _ = build("gpt_fast", "plain")
    torch._dynamo.reset()
    with pytest.raises(Exception, match=needle):  # dynamo wraps backend errors; the message names the option
        torch.compile(model, backend="moespec", options=options)(torch.randint(0, 96, (1, 4)))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "8"])
def test_bad_runtime_budget(bad):
    with pytest.raises(ValueError, match="budget"):
        with msc.budget(bad):
            pass
    with pytest.raises(ValueError, match="policy"):
        with msc.budget(4, policy="nope"):
            pass


def test_budget_above_e_is_clamped_and_exact():
    model, e, k = build("gpt_fast", "plain")
    x = torch.randint(0, 96, (1, 12))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moespec", options={"budget": 10 * e, "inner": "eager"})
    with torch.no_grad(), msc.record_experts() as rec:
        got = compiled(x).logits
        want = model(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(ev.budget is None for ev in rec.events)  # C >= E: exact, reported as unbudgeted


class DenseLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 50)

    def forward(self, ids):
        return self.head(self.mlp(self.embed(ids)))


def test_model_without_moe_compiles_unchanged_with_one_warning():
    torch._dynamo.reset()
    model = DenseLM().eval()
    compiled = torch.compile(model, backend="moespec", options={"budget": 4, "inner": "eager"})
    x = torch.randint(0, 50, (1, 9))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = compiled(x)
            compiled(torch.randint(0, 50, (1, 5)))  # a recompile for a new shape: still one warning
    mine = [w for w in caught if "moespec" in str(w.message)]
    assert len(mine) == 1 and "no MoE block" in str(mine[0].message)
    torch.testing.assert_close(got, model(x))


class ReluRouterMoE(GptFastMoE):
    """A router shape moespec does not understand: top-k over relu(logits), weights used unnormalized."""

    def route(self, x):
        scores = F.relu(self.gate(x))
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        return weights, ids


def test_unknown_router_is_left_alone_and_explained():
    torch.manual_seed(0)
    model = TinyLM(ReluRouterMoE).eval()
    x = torch.randint(0, 96, (1, 10))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moespec", options={"budget": 3, "inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits)
    report = msc.explain(model, x)
    assert len(report.blocks) == 2 and not any(b.rewritten for b in report.blocks)
    assert all("relu" in b.reason for b in report.blocks), report.table()


def test_counters_show_what_matched():
    model, _, _ = build("qwen3_moe", "grouped_mm")
    torch._dynamo.reset()
    counters["moespec"].clear()
    with torch.no_grad():
        torch.compile(model, backend="moespec", options={"inner": "eager"})(torch.randint(0, 96, (1, 6)),
                                                                          use_cache=False)
    c = counters["moespec"]
    assert c["routers_found"] == 2 and c["routers_budgeted"] == 2
    assert c["experts_fused"] == 2 and c["graphs"] == 1


def test_dynamic_lengths_compile_once_per_shape_class_with_inductor():
    """A 1-token step and 16- and 48-token verify passes: no recompile per length (dynamo specializes
    length 1, and marks the length dynamic on the second size; later lengths reuse that graph)."""
    model, e, k = build("qwen3_moe", "grouped_mm")
    torch._dynamo.reset()
    graphs = []

    def count(gm, example_inputs, options=None):
        graphs.append(gm)
        return msc.moespec_backend(gm, example_inputs, options={"budget": 6})

    compiled = torch.compile(model, backend=count)
    lengths = [1, 16, 48, 1, 16, 32, 40, 48]
    with torch.no_grad():
        for t in lengths:
            x = torch.randint(0, 96, (1, t))
            with msc.record_experts() as rec:
                got = compiled(x, use_cache=False).logits
            assert got.shape[1] == t
            assert max(len(ev.experts) for ev in rec.events) <= 6
    assert len(graphs) <= 3, len(graphs)


def test_backend_found_by_entry_point_without_import():
    code = ("import torch, torch.nn as nn\n"
            "m = nn.Linear(4, 4)\n"
            "out = torch.compile(m, backend='moespec', options={'inner': 'eager'})(torch.randn(2, 4))\n"
            "import sys; assert 'moe_spec_compile' in sys.modules; print('ok', tuple(out.shape))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ok (2, 4)" in res.stdout


def test_experts_region_that_refuses_fp32_is_matched_in_its_traced_dtype():
    """identify runs the experts region on synthetic fp32 tokens; a region holding a kernel that takes only
    the model's dtype (torch._grouped_mm on some GPUs) runs in the dtypes it was traced with instead, and
    a region that runs in neither is declined with the reason, never a crash."""
    import torch.fx as fx

    from moe_spec_compile.passes.experts import _run_region
    from moe_spec_compile.passes.graph_utils import Declined

    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    x.meta["val"] = torch.empty(3, 4, dtype=torch.bfloat16)
    w.meta["val"] = torch.empty(4, 5, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    xv, wv = torch.randn(3, 4, generator=gen), torch.randn(4, 5, generator=gen)

    def bf16_only(a, b):
        if a.dtype != torch.bfloat16:
            raise RuntimeError("expected bf16 operands")
        return a @ b

    out, tol = _run_region(bf16_only, [x, w], [xv, wv])
    assert tol == 2e-2 and out.dtype == torch.float32
    assert torch.allclose(out, xv @ wv, rtol=2e-2, atol=2e-2 * (xv @ wv).abs().max().item())
    out, tol = _run_region(lambda a, b: a @ b, [x, w], [xv, wv])  # runs in fp32: matched at fp32 precision
    assert tol == 1e-4 and torch.equal(out, xv @ wv)

    def broken(a, b):
        raise RuntimeError("no kernel for this device")

    with pytest.raises(Declined, match="no kernel for this device"):
        _run_region(broken, [x, w], [xv, wv])
