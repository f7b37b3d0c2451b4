"""Budgeted verify passes replayed as CUDA graphs equal the same passes run eagerly; one graph per tree-size
bucket serves every budget; a capture succeeding is itself the proof that no host sync sits inside the captured
region (CUDA refuses one while a stream captures). Skips without CUDA; run by benchmarks/gpu_suite.py (part a).

Legend: N verify pass size (bucket), C budget.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import moe_spec_compile as msc  # noqa: E402

from moe_models import build, tiny_draft  # noqa: E402

pytestmark = pytest.mark.gpu
PROMPT = [5, 17, 33, 2, 90, 41, 8, 5, 17, 33]


@pytest.mark.parametrize("policy", ["substitute", "truncate"])
def test_budgeted_graph_replay_equals_eager(policy):
    model = build("qwen3_moe")[0].cuda()  # 12 experts, top-4 (tests/moe_models.py)
    prompt = torch.tensor([PROMPT], device="cuda")
    runs = {}
    for graphs in (True, False):
        dec = msc.SpeculativeDecoder(model, drafter=msc.NgramDrafter(), tree=msc.TreeSpec(8, 3, 2), policy=policy,
                                     compile=True, compile_options={"inner": "eager"}, cuda_graphs=graphs)
        runs[graphs] = []
        for c in (4, 6, None):
            msc.reset_expert_stats()
            runs[graphs].append(dec.generate(prompt, max_new_tokens=12, eos_token_id=None, budget=c))
            stats = msc.expert_stats()  # device counters: they count during graph replay too
            if c is not None:  # exact passes may run on the plain target (FastestExact), which counts nothing
                assert stats and all(s["passes"] >= len(runs[graphs][-1].stats.verify) for s in stats.values())
                assert all(s["experts_per_pass"] <= c for s in stats.values())
        if graphs:
            # one graph per tree-size bucket, whatever the budget (budgets are device data)
            assert dec.runner.captures == len({n for out in runs[graphs] for n, _ in out.stats.buckets})
    for replayed, eager in zip(runs[True], runs[False]):
        assert replayed.sequences.tolist() == eager.sequences.tolist()
        assert replayed.stats.buckets == eager.stats.buckets


def test_one_captured_graph_serves_every_budget():
    """Budgets as data: a forward captured once replays under budgets 8, 16, 32 and None; each replay equals the
    eager model under the same budget, and the device counters count experts during replay."""
    torch._dynamo.reset()
    model = build("olmoe")[0].cuda()  # 16 experts, top-4
    compiled = torch.compile(model, backend="moespec", options={"inner": "eager"})
    x = torch.randint(0, 96, (1, 24), device="cuda")
    with torch.no_grad():
        for _ in range(2):  # warm up (compile, Triton autotune) outside the capture
            compiled(x, use_cache=False)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with msc.budget(8), torch.cuda.graph(graph):
            out = compiled(x, use_cache=False).logits
        for c in (8, 16, 32, None, 5):
            msc.reset_expert_stats()
            with msc.budget(c):
                graph.replay()
                torch.cuda.synchronize()
                want = compiled(x, use_cache=False).logits  # the same budget, not replayed
            torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)
            stats = msc.expert_stats()
            assert all(s["passes"] == 2 for s in stats.values())  # the replay and the eager run
            if c is not None and c < 16:
                assert all(s["experts_per_pass"] <= c for s in stats.values())


def test_drafter_cuda_graphs_propose_what_eager_does():
    """ModelDrafter(compile=True) on CUDA replays one captured graph per drafting pass size: the same proposals as
    the uncaptured drafter (the same accepted lengths step by step), and the target's greedy output."""
    torch._dynamo.reset()
    target, draft = build("qwen3_moe")[0].cuda(), tiny_draft().cuda()
    prompt = torch.tensor([PROMPT], device="cuda")
    want = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0].tolist()
    runs = {}
    for graphs in (False, True):
        drafter = msc.ModelDrafter(draft, compile=True, cuda_graphs=graphs)
        assert drafter.cuda_graphs == graphs
        dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=msc.TreeSpec(8, 3, 2), cuda_graphs=False)
        out = dec.generate(prompt, max_new_tokens=16, eos_token_id=None)
        assert out.sequences[0].tolist() == want
        runs[graphs] = out.stats.accepted_per_step
        assert (drafter._runner.captures > 0) == graphs
    assert runs[True] == runs[False]
