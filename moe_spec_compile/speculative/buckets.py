"""Buckets and the verify runner: pad each pass to a (rows bucket R, tree bucket N) shape and run it eagerly or by
replaying that shape's CUDA graph, under exactly the caller's budget and token weights.

(rows, tree size n, budget C, node weights w) -> shape (R, N) -> with msc.budget(C), msc.token_weights(w):
eager forward | capture once per (R, N), then replay

A compiled target (backend="moespec", dynamic=False) compiles once per pass shape. Budgets are device data (the
moespec ops read their tables on the device), so one graph per shape serves every budget (None included) and every
weighting; a budget change never recompiles nor recaptures, and C is never rounded. On CUDA each shape is captured
once (warm-up on a side stream, a pool shared by all shapes, static input buffers every call copies into); the
tables are written before the capture and each replay, never inside it. While a stream captures, the ops take their
budgeted path (reading C from the tables), so a graph captured under one budget replays under any other. Only the
CPU path has run in this project's CPU tests; the CUDA graph path is covered by tests/test_speculative_gpu.py.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import types

import torch

from ..budget import budget as budget_ctx
from ..budget import token_weights
from .kv import TreeCache, forward

__all__ = ["DEFAULT_TREE_BUCKETS", "pick_bucket", "VerifyRunner", "FastestExact", "compile_pass"]

DEFAULT_TREE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def pick_bucket(value: int | None, buckets) -> int | None:
    """The smallest bucket >= value; None stays None; past the largest bucket the value is its own bucket."""
    if value is None:
        return None
    for b in sorted(buckets):
        if b >= value:
            return b
    return value


def compile_pass(model, backend="inductor", dynamic: bool = False, options: dict | None = None):
    """torch.compile(model) for the decoder's own passes (verify, plain, drafting; a module or a function), without
    dynamo's guards on module attributes (torch.compiler.skip_guard_on_all_nn_modules_unsafe, where this torch has
    it; a caller's guard_filter_fn in options wins). Checking them cost 160-700 us before every pass on a 2-core CPU,
    50-220 us without (benchmarks/results/guards_cpu.md; an autoregressive step of the bundled target is 3-5 ms);
    what they guard (submodules, attributes such as ``training``) is fixed once a model is compiled here: the
    decoder refuses a target whose train/eval mode changed (SpeculativeDecoder.generate). Weight values are never
    guarded anyway. While experts are offloaded anywhere in the process (msc.offload_experts), the guards stay:
    they are what tells an offloaded model from an in-memory one of the same class.

    Each call compiles a frame of its own (_own_code): dynamo keeps graphs per code object, and without the module
    guards nothing would tell two models of one class apart (a draft and a target of one family, different layer
    counts or widths): the second would run the first one's graph."""
    options = dict(options or {})
    if getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None) is not None:
        options.setdefault("guard_filter_fn", _guards)
    kwargs = {"backend": backend, "dynamic": dynamic, "options": options or None}
    if not isinstance(model, torch.nn.Module):
        return torch.compile(_own_code(model), **kwargs)
    compiled = torch.compile(model, **kwargs)  # the OptimizedModule callers know (_orig_mod, state, modes)

    def run(*args, **kw):
        return model(*args, **kw)

    compiled.forward = compiled.dynamo_ctx(_own_code(run))  # dynamo's frame: this copy, the model inlined in it
    return compiled


_codes = itertools.count()


def _own_code(fn):
    """fn with a code object of its own (same body, closure and defaults), so dynamo's cache for it is its own."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_moespec{next(_codes)}")
    return functools.update_wrapper(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                                                       fn.__closure__), fn)


def _guards(entries) -> list[bool]:
    """compile_pass's guard filter, decided when a graph is traced: no guards on module attributes, except while
    experts are offloaded in this process (msc.offload_experts resets dynamo's caches when it starts and ends)."""
    from ..offload import offload_live

    if offload_live():
        return [True] * len(entries)
    return torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)


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
    """Runs padded passes [R, N] of a model; on CUDA one captured graph per pass shape (rows bucket R, tree bucket N)
    when use_graphs. Each rows bucket has its own cache (the decoder keeps them), so a graph always reads the same
    buffers. budgeted=False (a draft model's passes): no budget scope; c and weights must be None."""

    def __init__(self, model, use_graphs: bool, cache_position: bool = False, policy: str = "substitute",
                 budgeted: bool = True, hidden: tuple[int, ...] | None = None):
        self.model, self.use_graphs, self.cache_position = model, use_graphs, cache_position
        self.policy, self.budgeted, self.hidden = policy, budgeted, hidden
        self.static: dict[tuple[int, int], dict] = {}  # (R, N) -> static input buffers
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (R, N) -> graph, logits
        self.pool = None
        self.captures = 0

    def __call__(self, cache: TreeCache, tokens, positions, mask, slots, c=None,
                 weights: torch.Tensor | None = None, inputs: dict | None = None):
        """tokens, positions, slots [R, N]; mask [R, 1, N, S] (or a dict of them); c the budget (None: exact; any
        budget msc.budget takes); weights [R * N] fp32 the tokens' weights in the expert scores (0: padding; None:
        all 1); inputs: more tensors the model takes (the same names every call) -> logits [R, N, V], or (logits,
        hidden states [R, N, F]) when the runner was made with hidden (kv.forward)."""
        if not self.use_graphs:
            with self.scope(c, weights):
                return forward(self.model, cache, tokens, positions, mask, slots, self.cache_position, self.hidden,
                               inputs)
        key = tuple(tokens.shape)
        buf = self.static.get(key)
        if buf is None:
            buf = self.static[key] = {"tokens": tokens.clone(), "positions": positions.clone(),
                                      "slots": slots.clone(), "mask": _clone_mask(mask),
                                      # for every budgeted shape, whatever its first call had: a shape first run
                                      # exact (no weights) replayed its later budgets with every weight 1, padding
                                      # voting for experts (seen on an H200)
                                      "weights": torch.ones(tokens.numel(), device=tokens.device)
                                      if self.budgeted else None,
                                      "inputs": {k: v.clone() for k, v in (inputs or {}).items()}}
        for name, value in (("tokens", tokens), ("positions", positions), ("slots", slots), ("weights", weights)):
            if value is not None and buf[name] is not None:  # weights to an unbudgeted runner: scope() refuses
                buf[name].copy_(value)
        for name, value in (inputs or {}).items():
            buf["inputs"][name].copy_(value)
        _copy_mask(buf["mask"], mask)
        cache.slots = buf["slots"]  # forward() copies slots onto themselves: the graph reads this address
        with self.scope(c, buf["weights"] if weights is not None else None):  # tables written here, not captured
            if key not in self.graphs:
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                self.captures += 1
                self.graphs[key] = capture_graph(lambda: forward(
                    self.model, cache, buf["tokens"], buf["positions"], buf["mask"], buf["slots"],
                    self.cache_position, self.hidden, buf["inputs"]), self.pool)
            graph, out = self.graphs[key]
            graph.replay()
        return out

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

    def reset(self) -> None:
        """Drop captured graphs (their buffers belong to caches that are being replaced) and their pool: a pool
        whose graphs are all gone can still hold blocks (cuBLAS workspaces made during capture), and capturing
        into it again fails an allocator assert (use_count > 0), seen on an H200 with torch 2.11."""
        self.static.clear()
        self.graphs.clear()
        self.pool = None


def _clone_mask(mask):
    return {k: v.clone() for k, v in mask.items()} if isinstance(mask, dict) else mask.clone()


def _copy_mask(dst, src) -> None:
    if isinstance(dst, dict):
        for k in dst:
            dst[k].copy_(src[k])
    else:
        dst.copy_(src)


class FastestExact:
    """Exact passes run on the fastest of the exact paths, measured on this device per pass shape (R, N): the verify
    runner (the moespec-compiled target; a CUDA graph where captured), the plain target (the unmodified model:
    eager, or compiled by inductor when the moespec graph's inner compiler is inductor, see SpeculativeDecoder) and
    any `more` (name -> a pass: the plain target with transformers' "batched_mm" experts, decoder.BATCHED). All
    compute the model's own output. On the CPU a plain target often wins (the moespec graph also computes the budget's
    selection and counters, the budget being device data, which an exact pass gains nothing from); on a GPU the
    captured graph.

    Per shape, calls go round the paths: each is warmed up WARM times (the first calls compile), then timed TIMED
    times; the path with the lowest best time is kept for that shape from then on (``choices[(R, N)]``, the path's
    name; the minimum, since timing noise only ever adds). Budgeted passes never come here: a budget binds only in
    the moespec graph."""

    WARM = 2
    TIMED = 4

    def __init__(self, runner, plain, clock, **more):
        self.paths = {"moespec": runner, "plain": plain, **more}
        self.clock = clock
        self.calls: dict[tuple, dict[str, int]] = {}  # (R, N) -> calls per path while measuring
        self.times: dict[tuple, dict[str, list[float]]] = {}  # (R, N) -> timed calls per path
        self.choices: dict[tuple, str] = {}  # (R, N) -> the path kept
        self.last: str | None = None  # the path the latest call ran
        self.measuring = False  # the latest call was one of the measuring round (not the kept path)

    @property
    def choice(self) -> str | None:
        """The path kept for one-token passes of one row (autoregressive steps), None while measuring."""
        return self.choices.get((1, 1))

    def __call__(self, cache, tokens, positions, mask, slots) -> torch.Tensor:
        n = tuple(tokens.shape)  # the pass shape (R, N)
        kept = self.choices.get(n)
        self.measuring = kept is None
        if kept is not None:
            self.last = kept
            return self.paths[kept](cache, tokens, positions, mask, slots)
        calls = self.calls.setdefault(n, dict.fromkeys(self.paths, 0))
        times = self.times.setdefault(n, {p: [] for p in self.paths})
        name = self.last = min(calls, key=calls.get)  # round the paths, in order: moespec first
        calls[name] += 1
        t0 = self.clock()
        out = self.paths[name](cache, tokens, positions, mask, slots)
        if calls[name] > self.WARM:
            times[name].append(self.clock() - t0)
        if all(len(t) >= self.TIMED for t in times.values()):
            self.choices[n] = min(times, key=lambda p: min(times[p]))
        return out

    def settled(self, n) -> bool:
        """Has pass shape (R, N) been measured (its path chosen)? An int N means one row."""
        n = (1, n) if isinstance(n, int) else tuple(n)
        return n in self.choices
