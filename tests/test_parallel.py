"""moespec on models transformers shards over several ranks (tensor / expert parallel plans), under torchrun:
2 processes on the CPU with gloo, spawned here (tests/parallel_worker.py), one thread each, bounded time."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

from moe_spec_compile.distributed import unsupported
from moe_spec_compile.passes.graph_utils import Declined
from moe_spec_compile.passes.parallel import _check_remap

from moe_models import build

WORKER = Path(__file__).with_name("parallel_worker.py")
pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with gloo is needed"),
    pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                       reason="transformers loads parallel plans only with accelerate (pip install -e '.[dev]')"),
]


# PYTHONSAFEPATH: the ranks keep the repo root off sys.path too (our kernels/ folder would pass for the hub package)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONSAFEPATH": "1"}
TORCHRUN = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def run_ranks(model_dir: Path, mode: str, out: Path) -> list[dict]:
    run(TORCHRUN + [str(WORKER), str(model_dir), mode, str(out)], out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("family,mode", [("qwen3_moe", "tp+ep"), ("mixtral", "ep"), ("mixtral", "tp")])
def test_sharded_model_compiles_budgets_and_decodes(tmp_path, family, mode):
    why = unsupported(mode)
    if why:  # an older transformers (5.17 has no ep_size, so no tp+ep): refused by name
        assert repr(mode) in why
        pytest.skip(why)
    model, e, k = build(family)
    model.save_pretrained(tmp_path / "model")
    ranks = run_ranks(tmp_path / "model", mode, tmp_path)
    per_rank = e // 2
    for r, res in enumerate(ranks):
        assert res["world"] == 2 and res["rank"] == r
        assert res["sharded"], "the plan sharded nothing"
        experts_sharded = any("experts" in n for n in res["sharded"])
        assert experts_sharded or "ep" not in mode
        # explain names the layout; the local shard runs in fused_experts
        assert len(res["explain"]) == 2
        for _name, rewritten, experts, reason, parallel in res["explain"]:
            assert rewritten
            if "ep" in mode:
                first = r * per_rank
                assert f"experts {first}-{first + per_rank - 1} of {e} on this rank" in parallel
                assert experts.startswith("fused_experts"), (experts, reason)
            elif experts_sharded:  # transformers 5.17's Mixtral plan slices every expert: explained, model code
                assert experts == "model code" and "tensor parallelism" in reason and "sharded" in parallel
            else:
                assert "replicated" in parallel and experts.startswith("fused_experts"), (experts, reason)
        assert res["exact_err"] < 1e-5  # no budget: the single-process model's logits
        for policy, b in res["budgeted"].items():
            assert b["err"] < 1e-5, policy  # single-process moespec under the same budget
            assert b["vs_exact"] > 1e-4, policy  # and the budget binds
            assert [ev[:4] for ev in b["events"]] == [ev[:4] for ev in b["single"]]  # same sets A as one process
        assert all(res["generate"].values()), res["generate"]  # speculative greedy == the target's greedy
        assert "different requests" in res["mismatch"]  # refused on every rank, no hang
    assert ranks[0]["sampled"] == ranks[1]["sampled"]  # one generator state for all ranks
    for policy in ("substitute", "truncate"):
        ev0, ev1 = (res["budgeted"][policy]["events"] for res in ranks)
        for (_b, _n, c, a, l0), (*_, l1) in zip(ev0, ev1):
            assert len(a) <= c
            if "ep" in mode:  # each rank loads only the experts of A it holds
                assert all(x < per_rank for x in l0) and all(x >= per_rank for x in l1)
                assert sorted(l0 + l1) == a
            else:
                assert l0 == l1 == a


def _remap_graph(rank: int, count: int, wrong: bool):
    """A traced remap with fake values, as the pass sees one: (remap nodes, ids, w, local ids, local w)."""

    def remap(ids, w):
        off = (ids // count) != rank
        local = torch.where(off, count, ids % count + (1 if wrong else 0))
        return local, w.masked_fill(off, 0.0)

    gm = fx.symbolic_trace(remap)
    args = (torch.randint(0, 2 * count, (5, 2)), torch.rand(5, 2))
    env = {}
    for n, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], args):
        env[n] = value
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            a = fx.node.map_arg(n.args, env.__getitem__)
            kw = fx.node.map_arg(n.kwargs, env.__getitem__)
            env[n] = n.target(*a, **kw) if n.op == "call_function" else getattr(a[0], n.target)(*a[1:], **kw)
        n.meta["val"] = env.get(n)
    ids, w = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    local, lw = out.args[0]
    nodes = {n for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    return nodes, ids, w, local, lw


def test_remap_check_accepts_expert_parallel_and_refuses_anything_else():
    nodes, ids, w, local, lw = _remap_graph(rank=1, count=4, wrong=False)
    _check_remap(nodes, ids, w, local, lw, 8, 2, first=4, count=4)
    with pytest.raises(Declined, match="not to experts 0-3"):
        _check_remap(nodes, ids, w, local, lw, 8, 2, first=0, count=4)  # another rank's shard
    nodes, ids, w, local, lw = _remap_graph(rank=1, count=4, wrong=True)
    with pytest.raises(Declined, match="not expert parallelism moespec knows"):
        _check_remap(nodes, ids, w, local, lw, 8, 2, first=4, count=4)  # local ids off by one


def test_generate_command_under_torchrun(tmp_path):
    """`moespec generate --model DIR` under torchrun: the target sharded (experts split), rank 0 prints, the greedy
    tokens under a budget are the single process's."""
    model, _e, k = build("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    args = ["generate", "--model", str(tmp_path / "model"), "--prompt-ids", "5,17,33,2,9,40,11", "--tree", "4",
            "--budget", str(k + 1), "--max-new-tokens", "10", "--json"]
    ranks = run(TORCHRUN + ["-m", "moe_spec_compile.commands"] + args + ["--parallel", "ep"], tmp_path)
    single = run([sys.executable, "-P", "-m", "moe_spec_compile.commands"] + args, tmp_path)
    lines = [ln for ln in ranks.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    got, want = json.loads(lines[0]), json.loads(single.stdout)
    assert got["new_token_ids"] == want["new_token_ids"] and len(got["new_token_ids"]) == 10
