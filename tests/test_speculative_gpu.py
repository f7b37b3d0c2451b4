"""Budgeted verify passes replayed as CUDA graphs equal the same passes run eagerly, per (tree size, budget)
bucket; a capture succeeding is itself the proof that no host sync sits inside the captured region (CUDA
refuses one while a stream captures). Skips without CUDA; run by benchmarks/gpu_suite.py (part a).

Legend: N verify pass size (bucket), C budget.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import moe_spec_compile as msc  # noqa: E402

from moe_models import build  # noqa: E402

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
        runs[graphs] = [dec.generate(prompt, max_new_tokens=12, eos_token_id=None, budget=c) for c in (4, 6, None)]
        if graphs:
            assert dec.runner.captures == len({b for out in runs[graphs] for b in out.stats.buckets})
    for replayed, eager in zip(runs[True], runs[False]):
        assert replayed.sequences.tolist() == eager.sequences.tolist()
        assert replayed.stats.buckets == eager.stats.buckets
