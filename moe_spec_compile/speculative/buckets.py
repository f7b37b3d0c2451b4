"""Buckets and the verify runner: pad each verify pass to a tree-size bucket and run it eagerly or by
replaying that bucket's CUDA graph, under exactly the caller's budget and token weights.

(tree size n, budget C, node weights w) -> bucket N >= n -> with msc.budget(C), msc.token_weights(w):
eager forward | capture once per N, then replay

Legend: N padded pass size, S cache slots, V vocabulary.

A compiled target (backend="moespec", dynamic=False) compiles once per pass size N. Budgets are device
data: ``msc.budget(C)`` and ``msc.token_weights(w)`` write the moespec ops' tables in place, and the ops read
them on the device, so one graph per N serves every budget (None included) and every weighting; a budget
change never recompiles nor recaptures, and C is never rounded. On CUDA each N is captured once: warm-up on
a side stream, capture into a pool shared by all buckets, static input buffers per N (tokens, positions,
mask, write slots) that every call copies into. The budget and weight tables are written before the capture
(and before each replay), never inside it: a capture may not record host-to-device copies. While a stream
captures, the ops always take their budgeted path (reading C from the tables), so a graph captured under
one budget replays correctly under any other. The policy is host-side and is the runner's own (fixed per
decoder). Only the CPU path (no capture) has been exercised by this project's CPU tests; the CUDA graph
path follows torch.cuda.CUDAGraph's rules and is covered by tests/test_speculative_gpu.py on a GPU.
"""

from __future__ import annotations

import contextlib

import torch

from ..budget import budget as budget_ctx
from ..budget import token_weights
from .kv import TreeCache, forward

__all__ = ["DEFAULT_TREE_BUCKETS", "pick_bucket", "VerifyRunner", "FastestExact"]

DEFAULT_TREE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def pick_bucket(value: int | None, buckets) -> int | None:
    """The smallest bucket >= value; None stays None; past the largest bucket the value is its own bucket."""
    if value is None:
        return None
    for b in sorted(buckets):
        if b >= value:
            return b
    return value


def capture_graph(run, pool):
    """Warm `run` up twice on a side stream (compiles, allocates workspaces), then capture one call into a CUDA
    graph sharing `pool` -> (graph, the call's output, whose storage each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out


class VerifyRunner:
    """Runs padded verify passes of a target; one CUDA graph per pass size N when use_graphs."""

    def __init__(self, model, cache: TreeCache, use_graphs: bool, cache_position: bool = False,
                 policy: str = "substitute", budgeted: bool = True):
        self.model = model
        self.policy = policy
        self.budgeted = budgeted  # False (a draft model's passes): no budget scope, c and weights must be None
        self.cache = cache
        self.use_graphs = use_graphs
        self.cache_position = cache_position
        self.static: dict[int, dict] = {}  # N -> static input buffers
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # N -> (graph, its logits)
        self.pool = None
        self.captures = 0

    def __call__(self, tokens, positions, mask, slots, c=None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions, slots [N]; mask [1, 1, N, S] (or a dict of them); c the budget (None: exact; any
        budget msc.budget takes); weights [N] fp32 the tokens' weights in the expert scores (0: padding; None:
        all 1) -> logits [N, V]."""
        if not self.use_graphs:
            with self.scope(c, weights):
                return forward(self.model, self.cache, tokens, positions, mask, slots, self.cache_position)
        n = tokens.shape[0]
        buf = self._buffers(n, mask)
        buf["tokens"].copy_(tokens)
        buf["positions"].copy_(positions)
        buf["slots"].copy_(slots)
        _copy_mask(buf["mask"], mask)
        self.cache.slots = buf["slots"]
        with self.scope(c, weights):  # tables written here, outside any capture
            if n not in self.graphs:
                self.graphs[n] = self._capture(buf)
            graph, logits = self.graphs[n]
            graph.replay()
        return logits

    def scope(self, c, weights: torch.Tensor | None = None):
        """``msc.budget(c)`` (exactly C, whatever the pass size: max_budget_tokens only keeps prefills exact)
        and ``msc.token_weights(weights)``: both write device tables in place."""
        stack = contextlib.ExitStack()
        if not self.budgeted:
            if c is not None or weights is not None:
                raise ValueError("this runner runs unbudgeted passes (a draft model's): c and weights must be None")
            return stack
        stack.enter_context(budget_ctx(c, policy=self.policy, max_budget_tokens=None))
        if weights is not None:
            stack.enter_context(token_weights(weights))
        return stack

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

    def _capture(self, buf):
        """Warm up on a side stream (compiles, allocates workspaces), then capture one forward. Called inside
        scope(): the budget and weight tables already hold this call's values, and the graph reads them
        by address at every replay."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        self.captures += 1
        return capture_graph(lambda: self._run_static(buf), self.pool)

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


class FastestExact:
    """Exact passes run on the faster of two exact paths, measured on this device per pass size N: the verify
    runner (the moespec-compiled target; a CUDA graph where captured) and the plain target (the unmodified model:
    eager, or compiled by inductor when the moespec graph's inner compiler is inductor, see SpeculativeDecoder).
    Both compute the model's own output. On the CPU the plain target often wins (the moespec ops are opaque to
    inductor's fusion and cost a Python dispatch each, which an exact pass gains nothing from); on a GPU the
    captured graph.

    Per N, calls alternate between the two: each is warmed up WARM times (the first calls compile), then timed
    TIMED times; the path with the lower best time is kept for that N from then on (``choices[N]``: "moespec" or
    "plain"; the minimum, since timing noise only ever adds). Budgeted passes never come here: a budget binds
    only in the moespec graph."""

    WARM = 2
    TIMED = 4

    def __init__(self, runner, plain, clock):
        self.paths = {"moespec": runner, "plain": plain}
        self.clock = clock
        self.calls: dict[int, dict[str, int]] = {}  # N -> calls per path while measuring
        self.times: dict[int, dict[str, list[float]]] = {}  # N -> timed calls per path
        self.choices: dict[int, str] = {}  # N -> the path kept
        self.last: str | None = None  # the path the latest call ran

    @property
    def choice(self) -> str | None:
        """The path kept for one-token passes (autoregressive steps), None while measuring."""
        return self.choices.get(1)

    def __call__(self, tokens, positions, mask, slots) -> torch.Tensor:
        n = tokens.shape[0]
        kept = self.choices.get(n)
        if kept is not None:
            self.last = kept
            return self.paths[kept](tokens, positions, mask, slots)
        calls = self.calls.setdefault(n, {"moespec": 0, "plain": 0})
        times = self.times.setdefault(n, {"moespec": [], "plain": []})
        name = self.last = min(calls, key=lambda p: (calls[p], p))  # alternate, moespec first
        calls[name] += 1
        t0 = self.clock()
        out = self.paths[name](tokens, positions, mask, slots)
        if calls[name] > self.WARM:
            times[name].append(self.clock() - t0)
        if all(len(t) >= self.TIMED for t in times.values()):
            self.choices[n] = min(times, key=lambda p: min(times[p]))
        return out

    def settled(self, n: int) -> bool:
        """Has pass size N been measured (its path chosen)?"""
        return n in self.choices
