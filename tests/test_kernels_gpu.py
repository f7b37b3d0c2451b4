"""The Triton fused experts on a GPU: bf16 as well, the real model shapes, CUDA graphs, no host syncs.

Legend: T tokens, E experts, k top-k, H hidden, I intermediate, C budget. Skips without CUDA; the same
kernels run on the CPU under TRITON_INTERPRET=1 in test_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from moe_spec_compile.kernels import align_by_expert, fused_experts  # noqa: E402
from moe_spec_compile.kernels.tune import MODEL_SHAPES, expert_weights, random_routing  # noqa: E402
from moe_spec_compile.ops import fused_experts_torch  # noqa: E402

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}  # relative to the output's scale


def _case(model, t, c, dtype, seed=0):
    e, h, i, k, activation, gpt_oss = MODEL_SHAPES[model]
    gen = torch.Generator().manual_seed(seed)
    wgu, wd, bgu, bd = expert_weights(e, h, i, dtype, "cuda", gpt_oss, seed)
    x = torch.randn(t, h, generator=gen).to("cuda", dtype)
    ids, tw = random_routing(t, k, e, c, gen, "cuda")
    return (x, ids, tw.to(dtype), wgu, wd, activation, bgu, bd, gpt_oss)


def _assert_close(out, ref, dtype):
    scale = ref.float().abs().max().item() + 1e-6
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} against scale {scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "olmoe-1b-7b", "gpt-oss-20b"])
@pytest.mark.parametrize("t", [1, 7, 64, 257])
def test_model_shapes_match_torch(model, t, dtype):
    e, _, _, k, _, _ = MODEL_SHAPES[model]
    args = _case(model, t, min(e, 2 * k), dtype)
    _assert_close(fused_experts(*args), fused_experts_torch(*args), dtype)


@pytest.mark.parametrize("model", ["mixtral-8x7b", "deepseek-v3"])
def test_large_shapes_bf16(model):
    e, _, _, k, _, _ = MODEL_SHAPES[model]
    for t in (1, 32):
        args = _case(model, t, min(e, 4 * k), torch.bfloat16, seed=t)
        _assert_close(fused_experts(*args), fused_experts_torch(*args), torch.bfloat16)


@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_configs_agree_bf16(block_m, split):
    args = _case("olmoe-1b-7b", 48, 16, torch.bfloat16)
    cfg = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, SPLIT_K=split, num_warps=4, num_stages=3)
    _assert_close(fused_experts(*args, config=cfg), fused_experts_torch(*args), torch.bfloat16)


def test_no_host_sync_and_cuda_graph_replay():
    """One captured graph serves new routings written into its static inputs."""
    x, ids, tw, wgu, wd, act, bgu, bd, inter = _case("qwen3-30b-a3b", 16, 16, torch.bfloat16)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_experts(x, ids, tw, wgu, wd, act, bgu, bd, inter)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_experts(x, ids, tw, wgu, wd, act, bgu, bd, inter)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, ids, tw, wgu, wd, act, bgu, bd, inter)
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        new_ids, new_tw = random_routing(16, ids.shape[1], wgu.shape[0], 32, gen, "cuda")
        new_ids[0, 1] = -1
        ids.copy_(new_ids)
        tw.copy_(new_tw)
        x.copy_(torch.randn(x.shape, generator=gen).to(x))
        graph.replay()
        _assert_close(out, fused_experts_torch(x, ids, tw, wgu, wd, act, bgu, bd, inter), torch.bfloat16)


def test_budget_bounds_experts_loaded():
    """With a budget of C experts, the tiles name at most C experts: no other expert's weights are read."""
    for t, c in ((1, 8), (64, 16), (512, 32)):
        gen = torch.Generator().manual_seed(t)
        ids, _ = random_routing(t, 8, 256, c, gen, "cuda")
        meta = align_by_expert(ids, 256, 16)
        used = meta.tile_expert[meta.tile_expert >= 0].unique()
        assert used.numel() <= c
        assert set(used.tolist()) == set(ids.unique().tolist())


def test_deterministic():
    args = _case("olmoe-1b-7b", 64, 64, torch.bfloat16)
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4, num_warps=4, num_stages=3)
    first = fused_experts(*args, config=cfg)
    assert all(torch.equal(first, fused_experts(*args, config=cfg)) for _ in range(3))


def test_op_uses_triton_on_cuda(monkeypatch):
    """impl="auto" on CUDA tensors runs these kernels."""
    import moe_spec_compile.kernels as kernels
    from moe_spec_compile import experts_op

    calls = []
    monkeypatch.setattr(experts_op, "_triton_launcher", lambda: lambda *a: calls.append(1) or kernels.fused_experts(*a))
    x, ids, tw, wgu, wd, act, bgu, bd, inter = _case("olmoe-1b-7b", 4, 16, torch.bfloat16)
    torch.ops.moespec.fused_experts(x, ids, tw, wgu, wd, act)
    assert calls
