"""Routing metadata for the grouped GEMMs, built on the device in one Triton program (no host sync).

topk_ids [T, k] -> count per expert (a histogram) -> pad each count to BLOCK_M -> per chunk of pairs: sort
(expert, position) keys, each pair's row = its expert's next free row + its rank in the chunk
-> sorted pairs [P] (T*k marks padding) + one expert id per M tile (-1 past the end)

Legend: T tokens, E experts, k top-k, P padded rows (a static bound, so shapes never depend on data).
Slots with id -1 are dropped; ids outside [0, E) are dropped too (the kernels cannot raise without a
sync). Experts that received no pair own no tile, so the GEMMs never read their weights.
Cost: O(T*k log^2 CHUNK) for the pairs (a bitonic sort per chunk) and O(E x P / BLOCK_M) for the tile labels;
the first version held a one-hot [E, chunk] per chunk, O(E x T*k): 438 us at E = 256, T*k = 4096 on an H200
(benchmarks/results/gpu/README.md), 17x torch's argsort.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["RoutingMeta", "align_by_expert", "padded_rows"]

_MAX_CHUNK = 1024  # pairs sorted at once: 4 keys per thread over 8 warps
_TILE_ELEMS = 16384  # the [BINS, TILE_CHUNK] compare block of the tile labels, kept in registers
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
    BINS: tl.constexpr,  # next power of two > E: bin E collects the dropped slots
    CHUNK: tl.constexpr,  # pairs handled per step (a power of two)
    TILE_CHUNK: tl.constexpr,  # tiles labelled per step
    FILL: tl.constexpr,  # rows marked as padding per step
):
    """Grid (1,). Pass 1 counts pairs per expert; pass 2 marks every row padding, then per chunk sorts the
    keys expert * CHUNK + lane (stable: the (token, slot) order stays inside an expert) and writes each pair
    to its expert's next free row plus its rank among the chunk's pairs of that expert; pass 3 labels each
    M tile with its expert."""
    bins = tl.arange(0, BINS)
    lane = tl.arange(0, CHUNK)

    counts = tl.zeros([BINS], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        offs = start + lane
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        ids = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)  # dropped -> bin E
        counts += tl.histogram(ids, BINS)
    counts = tl.where(bins < num_experts, counts, 0)

    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # (BINS,)
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)

    for start in range(0, num_tiles * BLOCK_M, FILL):  # every row starts as padding ...
        rows = start + tl.arange(0, FILL)
        tl.store(sorted_ptr + rows, num_pairs, mask=rows < num_tiles * BLOCK_M)
    tl.debug_barrier()  # ... before any thread scatters a pair over it (one program: a CTA barrier suffices)

    running = ends - padded  # next free row of each expert's group
    for start in range(0, num_pairs, CHUNK):
        offs = start + lane
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        ids = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)
        here = tl.histogram(ids, BINS)  # this chunk's pairs per expert
        first = tl.cumsum(here, axis=0) - here  # sorted position of each expert's first pair in the chunk
        key = tl.sort(ids * CHUNK + lane)
        expert = key // CHUNK
        # sorted position p holds the (p - first[e])-th pair of expert e in this chunk
        row = tl.gather(running - first, expert, 0) + lane
        tl.store(sorted_ptr + row, (start + key - expert * CHUNK).to(tl.int32), mask=expert < num_experts)
        running += here

    for start in range(0, num_tiles, TILE_CHUNK):
        tiles = start + tl.arange(0, TILE_CHUNK)
        first_row = tiles * BLOCK_M
        # groups are contiguous and in expert order: a tile's expert is the number of groups ending at or before it
        expert = tl.sum((ends[:, None] <= first_row[None, :]).to(tl.int32), axis=0)  # bins past E end at total
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
    bins = triton.next_power_of_2(num_experts + 1)
    chunk = max(16, min(triton.next_power_of_2(max(num_pairs, 1)), _MAX_CHUNK))
    tile_chunk = max(16, min(triton.next_power_of_2(tile_expert.shape[0]), _TILE_ELEMS // bins))
    _align_kernel[(1,)](
        ids, sorted_pairs, tile_expert, num_padded, num_pairs, num_experts, tile_expert.shape[0],
        BLOCK_M=block_m, BINS=bins, CHUNK=chunk, TILE_CHUNK=tile_chunk, FILL=1024,
        num_warps=_NUM_WARPS,
    )
    return RoutingMeta(sorted_pairs, tile_expert, num_padded, block_m)
