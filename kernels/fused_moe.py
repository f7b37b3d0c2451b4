"""Triton fused experts for verify passes: read each routed expert's weights once, and no other expert's.

routing -> align by expert -> gate_up GEMM + act -> down GEMM x weight (split-K partials) -> combine

Legend: T tokens, E experts, k top-k, H hidden, I intermediate, P padded rows (routing.py).
Tiles: one program per (M tile of one expert, N block[, K split]); unused tiles exit at once, so a
budget of C experts loads at most C experts' weights. Accumulation in fp32; the intermediate is kept
in the weights' dtype (what the down GEMM's dot consumes); the down GEMM writes fp32 partials per
(split, pair) that the combine sums in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ..checks import check_fused_experts_args, check_ids_in_range
from . import config as _cfg
from .routing import align_by_expert

__all__ = ["fused_experts", "select_config"]

_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _configs(dtype: torch.dtype) -> list[dict[str, int]]:
    """The tuner's search space. BLOCK_M stops at 64: verify passes rarely put more pairs on an expert,
    and larger M tiles only pad. 16 is tl.dot's smallest tile."""
    wide = dtype != torch.float32  # fp32 tiles take twice the shared memory per stage
    out = []
    for bm in (16, 32, 64):
        for bn in (32, 64, 128):
            for bk in ((64, 128, 256) if wide else (32, 64)):
                for split in (1, 2, 4):
                    for warps in (4, 8) if bm >= 32 else (4,):  # 8 warps cannot split a 16-row tile well
                        for stages in ((3, 4) if wide else (2, 3)):
                            if bm * bk + 2 * bk * bn > 3 * 128 * 128:  # registers/smem per stage
                                continue
                            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                                            num_warps=warps, num_stages=stages))
    return out


def _default_config(t: int, k: int, e: int, h: int, i: int, dtype: torch.dtype, sms: int | None) -> dict[str, int]:
    """A config for shapes nobody tuned. The M tile follows the pairs per active expert; BLOCK_N shrinks
    and the down GEMM splits K until about two waves of programs cover the GPU."""
    pairs = t * k
    per_expert = pairs / max(1, min(e, pairs))
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64
    wide = dtype != torch.float32
    bk = (128 if bm <= 32 else 64) if wide else 32
    tiles = min(e, pairs) + pairs // bm  # a bound on the M tiles in use
    bn = 64
    if sms is not None and tiles * triton.cdiv(i, bn) < 2 * sms:
        bn = 32
    split = 1
    if sms is not None:
        down_programs = tiles * triton.cdiv(h, bn)
        k_blocks = triton.cdiv(i, bk)
        while split < 8 and down_programs * split < 2 * sms and k_blocks >= 8 * split:
            split *= 2
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=4 if wide else 3)


def select_config(t: int, k: int, e: int, h: int, i: int, dtype: torch.dtype, device: torch.device,
                  config_dir=None) -> dict[str, int]:
    """The tuned table's bucket closest to T (else the defaults), then MOESPEC_KERNEL_CONFIG on top."""
    pinned = os.environ.get(_cfg.ENV_VAR, "")
    return dict(_select(t, k, e, h, i, dtype, torch.device(device), str(config_dir or ""), pinned,
                        _cfg.table_generation()))


@functools.lru_cache(maxsize=1024)
def _select(t, k, e, h, i, dtype, device, config_dir, pinned, generation) -> dict[str, int]:
    """select_config's lookup, cached (no file reads per call); `generation` (config.table_generation()) is only
    part of the key: a table written after a lookup makes a new key, so it is seen."""
    table = _cfg.load_table(_cfg.device_name(device), e, h, i, dtype, config_dir or None)
    cfg = _cfg.pick_bucket(table, t) if table else _default_config(t, k, e, h, i, dtype, _num_sms(device))
    return _cfg.check_config({**cfg, **(_cfg.parse_config(pinned) if pinned else {})})


@triton.jit
def _tile_rows(sorted_ptr, pid_m, num_pairs, BLOCK_M: tl.constexpr):
    """The padded rows of M tile pid_m: (rows, pair t*k+j of each row, row holds a pair), each (BLOCK_M,)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + offs_m)
    return offs_m, pairs, pairs < num_pairs


@triton.jit
def _gate_up_kernel(
    x_ptr, stride_xt, stride_xh,  # (T, H) hidden
    w_ptr, stride_we, stride_wn, stride_wk,  # (E, 2I, H) w_gate_up, any strides
    b_ptr, stride_be, stride_bn,  # (E, 2I) b_gate_up (unused without HAS_BIAS)
    out_ptr, stride_om, stride_on,  # (P, I) act(gate) * up per padded row
    sorted_ptr,  # (P,) pair t*k+j per padded row, T*k = padding
    tile_expert_ptr,  # (P // BLOCK_M,) expert per M tile, -1 = unused
    num_pairs, H, N_INTER, top_k, num_tiles, alpha, limit,  # N_INTER = I
    INTERLEAVED: tl.constexpr,  # gate = rows 0::2, up = rows 1::2 (GPT-OSS); else [gate; up]
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (num_tiles * cdiv(I, BLOCK_N),): tile-fastest, so programs on one expert's consecutive
    tiles share its weight block in L2. Each computes act(x @ gate^T) * (x @ up^T) for BLOCK_M pairs
    and BLOCK_N intermediate columns, as one dot against 2*BLOCK_N weight rows ordered gate, up, gate,
    up... (for GPT-OSS that is the storage order, so transposed weights load contiguously)."""
    pid = tl.program_id(0)
    pid_m = pid % num_tiles
    pid_n = pid // num_tiles
    expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m, pairs, row_ok = _tile_rows(sorted_ptr, pid_m, num_pairs, BLOCK_M)
    tokens = tl.where(row_ok, pairs // top_k, 0).to(tl.int64)
    j = tl.arange(0, 2 * BLOCK_N)
    if INTERLEAVED:
        w_rows = pid_n * 2 * BLOCK_N + j
    else:
        w_rows = pid_n * BLOCK_N + j // 2 + (j % 2) * N_INTER
    w_ok = pid_n * BLOCK_N + j // 2 < N_INTER  # (2 * BLOCK_N,)
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xh  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + expert * stride_we + w_rows[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BK, 2BN)
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = offs_k < H - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & w_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bias = tl.load(b_ptr + expert * stride_be + w_rows * stride_bn, mask=w_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    acc_g, acc_u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))  # (BLOCK_M, BLOCK_N) each
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_INTER
    if ACTIVATION == "silu":
        h = acc_g * tl.sigmoid(acc_g) * acc_u
    elif ACTIVATION == "gelu":
        h = 0.5 * acc_g * (1.0 + tl.erf(acc_g * 0.7071067811865476)) * acc_u
    elif ACTIVATION == "gelu_tanh":
        inner = 0.7978845608028654 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        h = acc_g * tl.sigmoid(2.0 * inner) * acc_u  # 0.5 * (1 + tanh(z)) == sigmoid(2z)
    elif ACTIVATION == "relu":
        h = tl.maximum(acc_g, 0.0) * acc_u
    else:  # "swiglu_clamp", GPT-OSS
        gate = tl.minimum(acc_g, limit)
        up = tl.minimum(tl.maximum(acc_u, -limit), limit)
        h = (up + 1.0) * gate * tl.sigmoid(alpha * gate)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    a_ptr, stride_am, stride_ak,  # (P, I) intermediate from _gate_up_kernel
    w_ptr, stride_we, stride_wn, stride_wk,  # (E, H, I) w_down, any strides
    b_ptr, stride_be, stride_bn,  # (E, H) b_down (unused without HAS_BIAS)
    tw_ptr,  # (T*k,) routing weights
    out_ptr, stride_os, stride_op, stride_oh,  # (SPLIT_K, T*k, H) fp32 partials
    sorted_ptr,  # (P,)
    tile_expert_ptr,  # (P // BLOCK_M,)
    num_pairs, H, N_INTER, num_tiles,  # N_INTER = I
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (num_tiles * cdiv(H, BLOCK_N) * SPLIT_K,): (a @ w_down^T [+ bias]) * routing weight for
    BLOCK_M pairs, BLOCK_N hidden columns and one of SPLIT_K slices of I."""
    pid = tl.program_id(0)
    pid_m = pid % num_tiles
    rest = pid // num_tiles
    num_n = tl.cdiv(H, BLOCK_N)
    pid_n = rest % num_n
    pid_k = rest // num_n
    expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m, pairs, row_ok = _tile_rows(sorted_ptr, pid_m, num_pairs, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    k_span = tl.cdiv(tl.cdiv(N_INTER, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_span
    k_end = tl.minimum(N_INTER, k_start + k_span)
    offs_k = k_start + tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = offs_k < k_end - (k0 - k_start)
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        if pid_k == 0:  # the bias joins one split only
            bias = tl.load(b_ptr + expert * stride_be + offs_n * stride_bn, mask=n_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
    safe_pairs = tl.where(row_ok, pairs, 0).to(tl.int64)
    acc *= tl.load(tw_ptr + safe_pairs, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pid_k.to(tl.int64) * stride_os + safe_pairs[:, None] * stride_op + offs_n[None, :] * stride_oh
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(
    part_ptr, stride_ps, stride_pp, stride_ph,  # (SPLIT_K, T*k, H) fp32 partials
    ids_ptr,  # (T*k,) expert ids, -1 = empty slot (its partial rows were never written)
    out_ptr, stride_ot, stride_oh,  # (T, H)
    H, top_k, num_experts,
    SPLIT_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid (T, cdiv(H, BLOCK_H)): out[t] = sum over slots j, then splits s, of partial[s, t*k+j], in
    that fixed order."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in range(top_k):
        pair = t * top_k + j
        e = tl.load(ids_ptr + pair)
        used = (e >= 0) & (e < num_experts)
        for s in tl.static_range(SPLIT_K):
            part = tl.load(part_ptr + s * stride_ps + pair * stride_pp + offs_h * stride_ph, mask=h_ok, other=0.0)
            acc += tl.where(used, part, 0.0)  # an empty slot's rows were never written: drop whatever is there
    tl.store(out_ptr + t * stride_ot + offs_h * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


def _interpreted() -> bool:
    return type(_gate_up_kernel).__name__ == "InterpretedFunction"


def _scratch(shape, dtype, device) -> torch.Tensor:
    """Scratch buffers; tests set POISON_SCRATCH to fill them with NaN and prove nothing stale is read."""
    if POISON_SCRATCH:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


POISON_SCRATCH = False
_COMBINE_BLOCK_H = 256  # 256 fp32 lanes: one 1 KiB row slice per load, enough to keep a wave of programs busy


def fused_experts(
    hidden: torch.Tensor,  # [T, H]
    topk_ids: torch.Tensor,  # [T, k] int32/int64, -1 = empty slot
    topk_weights: torch.Tensor,  # [T, k]
    w_gate_up: torch.Tensor,  # [E, 2I, H], any strides
    w_down: torch.Tensor,  # [E, H, I], any strides
    activation: str = "silu",
    b_gate_up: torch.Tensor | None = None,  # [E, 2I]
    b_down: torch.Tensor | None = None,  # [E, H]
    interleaved: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    config: dict | None = None,
    out: torch.Tensor | None = None,  # [T, H], written in place when given
) -> torch.Tensor:
    """moespec::fused_experts on the Triton kernels (a GPU, or the CPU under TRITON_INTERPRET=1).

    config: tile keys of config.KEYS (missing ones come from select_config); MOESPEC_KERNEL_CONFIG
    overrides both. No host synchronisation: safe to capture in a CUDA graph."""
    check_fused_experts_args(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down)
    if hidden.device.type != "cuda" and not _interpreted():
        raise RuntimeError("the Triton fused-experts kernels need a CUDA device, or TRITON_INTERPRET=1 set "
                           "before moe_spec_compile.kernels is first imported")
    if _interpreted() and torch.bfloat16 in (hidden.dtype, w_gate_up.dtype, w_down.dtype):
        raise ValueError("bf16 under TRITON_INTERPRET=1 is refused: the interpreter's bf16 dot returns wrong "
                         "numbers; use fp32 or fp16 there, or impl='torch'")
    check_ids_in_range(topk_ids, w_gate_up.shape[0])
    t, h = hidden.shape
    k = topk_ids.shape[1]
    e, two_i, _ = w_gate_up.shape
    i = two_i // 2
    if out is None:
        out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    if t == 0:
        return out
    if k == 0 or i == 0:
        return out.zero_()
    cfg = select_config(t, k, e, h, i, w_gate_up.dtype, hidden.device)
    if config:
        cfg = _cfg.check_config({**cfg, **config, **_cfg.env_config()})  # the env var still wins
    wdtype = w_gate_up.dtype
    x = hidden if hidden.dtype == wdtype else hidden.to(wdtype)
    precision = "ieee" if wdtype == torch.float32 else "tf32"  # fp32 stays exact; tf32 is unused for 16-bit
    device = hidden.device
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        meta = align_by_expert(topk_ids, e, bm)
        tiles = meta.num_tiles
        rows = meta.sorted_pairs.shape[0]
        inter = _scratch((rows, i), w_down.dtype, device)  # [P, I]
        bg = b_gate_up if b_gate_up is not None else w_gate_up  # a dummy pointer when there is no bias
        _gate_up_kernel[(tiles * triton.cdiv(i, bn),)](
            x, x.stride(0), x.stride(1),
            w_gate_up, *w_gate_up.stride(),
            bg, bg.stride(0), bg.stride(1),
            inter, inter.stride(0), inter.stride(1),
            meta.sorted_pairs, meta.tile_expert,
            t * k, h, i, k, tiles, float(alpha), float(limit),
            INTERLEAVED=bool(interleaved),
            ACTIVATION=activation, HAS_BIAS=b_gate_up is not None, DOT_PRECISION=precision,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **launch,
        )
        partial = _scratch((split, t * k, h), torch.float32, device)  # [SPLIT_K, T*k, H]
        tw = topk_weights.reshape(-1)  # [T*k]
        bd = b_down if b_down is not None else w_down
        _down_kernel[(tiles * triton.cdiv(h, bn) * split,)](
            inter, inter.stride(0), inter.stride(1),
            w_down, *w_down.stride(),
            bd, bd.stride(0), bd.stride(1),
            tw,
            partial, *partial.stride(),
            meta.sorted_pairs, meta.tile_expert,
            t * k, h, i, tiles,
            HAS_BIAS=b_down is not None, DOT_PRECISION=precision, SPLIT_K=split,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **launch,
        )
        ids = topk_ids.reshape(-1)  # [T*k]
        _combine_kernel[(t, triton.cdiv(h, _COMBINE_BLOCK_H))](
            partial, *partial.stride(), ids, out, out.stride(0), out.stride(1), h, k, e,
            SPLIT_K=split, BLOCK_H=_COMBINE_BLOCK_H, num_warps=4,
        )
    return out

