"""Routing metadata for the grouped GEMMs, built on the device in one Triton program (no host sync).

topk_ids [T, k] -> count per expert -> pad each count to BLOCK_M -> stable scatter of (token, slot) pairs
                -> sorted pairs [P] (T*k marks padding) + one expert id per M tile (-1 past the end)

Legend: T tokens, E experts, k top-k, P padded rows (a static bound, so shapes never depend on data).
Slots with id -1 are dropped; ids outside [0, E) are dropped too (the kernels cannot raise without a
sync). Experts that received no pair own no tile, so the GEMMs never read their weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["RoutingMeta", "align_by_expert", "padded_rows"]

# Rows of the one-hot [BLOCK_E, CHUNK] block the kernel holds at once: 16K int32 values spread over
# 8 warps keep it in registers; larger blocks spill.
_ONEHOT_ELEMS = 16384
_NUM_WARPS = 8


@triton.jit
def _align_kernel(
    ids_ptr,  # (T*k,) int32 or int64, -1 = empty slot
    sorted_ptr,  # (P,) int32 out: pair index t*k+j per padded row, T*k = padding
    tile_expert_ptr,  # (P // BLOCK_M,) int32 out: expert of each M tile, -1 past the last used tile
    num_padded_ptr,  # (1,) int32 out: padded rows in use
    num_pairs,  # T*k
    num_experts,  # E
    num_tiles,  # P // BLOCK_M
    BLOCK_M: tl.constexpr,  # the M tile of the GEMMs; every expert's group is padded to it
    BLOCK_E: tl.constexpr,  # next power of two >= E
    CHUNK: tl.constexpr,  # pairs handled per step
    TILE_CHUNK: tl.constexpr,  # tiles labelled per step
    FILL: tl.constexpr,  # rows marked as padding per step
):
    """Grid (1,). Pass 1 counts pairs per expert; pass 2 marks every row padding, then scatters each
    pair to its padded row, keeping the (token, slot) order inside an expert (stable); pass 3 labels
    each M tile with its expert."""
    experts = tl.arange(0, BLOCK_E)
    real = experts < num_experts

    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        hit = ((ids[None, :] == experts[:, None]) & real[:, None]).to(tl.int32)  # (BLOCK_E, CHUNK)
        counts += tl.sum(hit, axis=1)

    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # (BLOCK_E,)
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)

    for start in range(0, num_tiles * BLOCK_M, FILL):  # every row starts as padding ...
        rows = start + tl.arange(0, FILL)
        tl.store(sorted_ptr + rows, num_pairs, mask=rows < num_tiles * BLOCK_M)
    tl.debug_barrier()  # ... before any thread scatters a pair over it (one program: a CTA barrier suffices)

    running = ends - padded  # next free row of each expert's group
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        hit = ((ids[None, :] == experts[:, None]) & real[:, None]).to(tl.int32)  # (BLOCK_E, CHUNK)
        before = tl.cumsum(hit, axis=1) - hit  # same-expert pairs earlier in this chunk
        row = tl.sum(hit * (before + running[:, None]), axis=0)  # (CHUNK,)
        kept = tl.sum(hit, axis=0) > 0
        tl.store(sorted_ptr + row, offs.to(tl.int32), mask=kept)
        running += tl.sum(hit, axis=1)

    for start in range(0, num_tiles, TILE_CHUNK):
        tiles = start + tl.arange(0, TILE_CHUNK)
        first_row = tiles * BLOCK_M
        # groups are contiguous and in expert order: a tile's expert is the number of groups ending at or before it
        expert = tl.sum((ends[:, None] <= first_row[None, :]).to(tl.int32), axis=0)
        expert = tl.where(first_row < total, expert, -1)
        tl.store(tile_expert_ptr + tiles, expert, mask=tiles < num_tiles)


class RoutingMeta:
    """The grouped layout of the (token, slot) pairs, all on the device."""

    def __init__(self, sorted_pairs, tile_expert, num_padded, block_m):
        self.sorted_pairs = sorted_pairs  # [P] int32, T*k = padding row
        self.tile_expert = tile_expert  # [P // BLOCK_M] int32, -1 = unused tile
        self.num_padded = num_padded  # [1] int32
        self.block_m = block_m

    @property
    def num_tiles(self) -> int:
        return self.tile_expert.shape[0]


def padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """P: a bound on the padded rows that holds for every routing (at most min(E, T*k) groups get padded)."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(max(rows, 1), block_m) * block_m


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> RoutingMeta:
    """topk_ids [T, k] -> RoutingMeta: pairs grouped by expert, each group padded to block_m rows."""
    ids = topk_ids.reshape(-1)  # [T*k]
    if not ids.is_contiguous():
        ids = ids.contiguous()
    num_pairs = ids.numel()
    rows = padded_rows(num_pairs, num_experts, block_m)
    sorted_pairs = torch.empty((rows,), dtype=torch.int32, device=ids.device)  # [P]
    tile_expert = torch.empty((rows // block_m,), dtype=torch.int32, device=ids.device)  # [P // BLOCK_M]
    num_padded = torch.empty((1,), dtype=torch.int32, device=ids.device)
    block_e = triton.next_power_of_2(max(num_experts, 2))
    chunk = max(16, min(triton.next_power_of_2(max(num_pairs, 1)), _ONEHOT_ELEMS // block_e))
    tile_chunk = max(16, min(triton.next_power_of_2(tile_expert.shape[0]), _ONEHOT_ELEMS // block_e))
    _align_kernel[(1,)](
        ids, sorted_pairs, tile_expert, num_padded, num_pairs, num_experts, tile_expert.shape[0],
        BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=chunk, TILE_CHUNK=tile_chunk, FILL=1024,
        num_warps=_NUM_WARPS,
    )
    return RoutingMeta(sorted_pairs, tile_expert, num_padded, block_m)
