"""Buckets and the verify runner: pad each verify pass to a tree-size bucket, round its budget up to a
budget bucket, and run it eagerly or by replaying that bucket's CUDA graph.

(tree size n, budget C) -> (bucket N >= n, bucket C' >= C) -> eager forward | capture once, then replay

Legend: N padded pass size, S cache slots, V vocabulary.

A compiled target (backend="moespec", dynamic=False) compiles once per pass size N; the budget is read
at run time by the moespec ops (``with budget(C')``), so a budget change never recompiles. On CUDA
each (N, C') is captured once: warm-up on a side stream, capture into a pool shared by all buckets,
static input buffers per N (tokens, positions, mask, write slots) that every call copies into. The
captured graph bakes in the budget that was in force at capture time, hence one graph per budget.
Only the CPU path (no capture) has been exercised by this project's tests; the CUDA graph path is
written to torch.cuda.CUDAGraph's rules but was not run on a GPU here.
"""

from __future__ import annotations

import torch

from ..budget import budget as budget_ctx
from .kv import TreeCache, forward

__all__ = ["DEFAULT_TREE_BUCKETS", "DEFAULT_BUDGET_BUCKETS", "pick_bucket", "VerifyRunner"]

DEFAULT_TREE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
DEFAULT_BUDGET_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def pick_bucket(value: int | None, buckets) -> int | None:
    """The smallest bucket >= value; None stays None (exact routing); past the largest bucket the
    value is its own bucket."""
    if value is None:
        return None
    for b in sorted(buckets):
        if b >= value:
            return b
    return value


class VerifyRunner:
    """Runs padded verify passes of a target; one CUDA graph per (N, C') when use_graphs."""

    def __init__(self, model, cache: TreeCache, use_graphs: bool, cache_position: bool = False,
                 policy: str = "substitute"):
        self.model = model
        self.policy = policy
        self.cache = cache
        self.use_graphs = use_graphs
        self.cache_position = cache_position
        self.static: dict[int, dict] = {}  # N -> static input buffers
        self.graphs: dict[tuple[int, int | None], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.captures = 0

    def __call__(self, tokens, positions, mask, slots, c: int | None) -> torch.Tensor:
        """tokens, positions, slots [N]; mask [1, 1, N, S] (or a dict of them) -> logits [N, V]."""
        if not self.use_graphs:
            with self._budget(c):
                return forward(self.model, self.cache, tokens, positions, mask, slots, self.cache_position)
        n = tokens.shape[0]
        buf = self._buffers(n, mask)
        buf["tokens"].copy_(tokens)
        buf["positions"].copy_(positions)
        buf["slots"].copy_(slots)
        _copy_mask(buf["mask"], mask)
        self.cache.slots = buf["slots"]
        key = (n, c)
        if key not in self.graphs:
            self.graphs[key] = self._capture(buf, c)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def _budget(self, c: int | None):
        """Budget C' for this pass whatever its size (max_budget_tokens only keeps prefills exact)."""
        return budget_ctx(c, policy=self.policy, max_budget_tokens=None)

    def _buffers(self, n: int, mask) -> dict:
        if n not in self.static:
            dev = self.cache.slots.device
            self.static[n] = {
                "tokens": torch.zeros(n, dtype=torch.long, device=dev),
                "positions": torch.zeros(n, dtype=torch.long, device=dev),
                "slots": torch.zeros(n, dtype=torch.long, device=dev),
                "mask": _clone_mask(mask),
            }
        return self.static[n]

    def _run_static(self, buf) -> torch.Tensor:
        # forward() copies slots into cache.slots, which *is* buf["slots"] here (same address)
        return forward(self.model, self.cache, buf["tokens"], buf["positions"], buf["mask"], buf["slots"],
                       self.cache_position)

    def _capture(self, buf, c: int | None):
        """Warm up on a side stream (compiles, allocates workspaces), then capture one forward."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._budget(c):
            for _ in range(2):
                self._run_static(buf)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), self._budget(c):
            logits = self._run_static(buf)
        self.captures += 1
        return graph, logits

    def reset(self) -> None:
        """Drop captured graphs (their buffers belong to a cache that is being replaced)."""
        self.static.clear()
        self.graphs.clear()


def _clone_mask(mask):
    return {k: v.clone() for k, v in mask.items()} if isinstance(mask, dict) else mask.clone()


def _copy_mask(dst, src) -> None:
    if isinstance(dst, dict):
        for k in dst:
            dst[k].copy_(src[k])
    else:
        dst.copy_(src)
