"""The `moespec` torch.compile backend.

dynamo graph -> passes (discover, fuse experts, budget routers) -> compile_fx (inductor) | eager
              CPU, inductor: compile_fx of passes/lower.py's copy (the ops as plain tensor code), the ops graph
              compiled at the first call that needs the host (recorded events, resident-only routing, other policies)

    torch.compile(model, backend="moespec", options={"budget": 16, "policy": "substitute"})

Options: budget (None = exact, an int C >= 1, {block name: C}, a list in layer order, msc.Coverage(share)),
policy ("substitute" | "truncate"), max_budget_tokens (passes with more tokens stay exact; default 256),
score ("prob" | "topk" | "top1": how experts are ranked for the budget set), inner ("inductor" | "eager"),
kernels ("auto" | "torch" | "triton"), fuse_experts (bool, default True).
"""

from __future__ import annotations

import re
import threading
import warnings
from dataclasses import dataclass

import torch

from .budget import (
    DEFAULT_SCORE,
    BudgetConfig,
    validate_budget_spec,
    validate_max_tokens,
    validate_policy,
    validate_score,
)

__all__ = ["CompileOptions", "moespec_backend", "parse_options", "is_moespec_compiled", "moespec_options"]

_KNOWN = ("budget", "policy", "max_budget_tokens", "score", "inner", "kernels", "fuse_experts")


@dataclass(frozen=True)
class CompileOptions:
    budget: BudgetConfig
    inner: str = "inductor"
    kernels: str = "auto"
    fuse_experts: bool = True


def parse_options(options: dict | None) -> CompileOptions:
    options = dict(options or {})
    unknown = sorted(set(options) - set(_KNOWN))
    if unknown:
        raise ValueError(f"unknown moespec option(s) {unknown}; known options are {list(_KNOWN)}")
    cfg = BudgetConfig(
        validate_budget_spec(options.get("budget")),
        validate_policy(options.get("policy", "substitute")),
        validate_max_tokens(options.get("max_budget_tokens", 256)),
        validate_score(options.get("score", DEFAULT_SCORE)),
    )
    inner = options.get("inner", "inductor")
    if inner not in ("inductor", "eager"):
        raise ValueError(f"option 'inner' must be 'inductor' or 'eager', got {inner!r}")
    kernels = options.get("kernels", "auto")
    if kernels not in ("auto", "torch", "triton"):
        raise ValueError(f"option 'kernels' must be 'auto', 'torch' or 'triton', got {kernels!r}")
    fuse = options.get("fuse_experts", True)
    if not isinstance(fuse, bool):
        raise ValueError(f"option 'fuse_experts' must be a bool, got {fuse!r}")
    return CompileOptions(cfg, inner, kernels, fuse)


class _Reports(threading.local):
    def __init__(self):
        self.sinks: list[list] = []


_reports = _Reports()
_warned_no_moe = set()


def moespec_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None):
    """The backend dynamo calls for each graph it captures."""
    from moe_spec_compile.passes import run_passes

    from .budget import register_spec
    from .naming import Sites, block_namer

    opts = parse_options(options)
    allow_recompiles(MIN_RECOMPILE_LIMIT)
    reports = run_passes(gm, example_inputs, opts.budget, impl=opts.kernels, fuse_experts=opts.fuse_experts,
                         block_names=block_namer())
    for sink in _reports.sinks:
        sink.extend(reports)
    if not reports and not _reports.sinks:
        _note_no_moe(gm, example_inputs)
    inputs, names, held = zip(*gm.meta["moespec_sites"]) if gm.meta.get("moespec_sites") else ((), (), ())
    sites = Sites(list(inputs), list(names), register_spec(opts.budget.budget), list(held))
    if opts.inner == "eager":
        return sites.wrap(gm.forward) if names else gm.forward
    from torch._inductor.compile_fx import compile_fx

    from . import record
    from .budget import routing_values
    from .offload import restricting

    cfg = opts.budget  # select_in_graph reads the policy, max_budget_tokens and score in force while it is traced
    traced_under = routing_values(cfg.policy, cfg.max_budget_tokens, cfg.score)
    try:
        lowered = _in_graph(gm, example_inputs, sites) if names else None
        in_graph = compile_fx(lowered[0], [*example_inputs, *lowered[1]]) if lowered is not None else None
    except Exception as err:  # e.g. a torch whose AOTAutograd refuses the appended inputs: the ops, as before
        warnings.warn(f"moespec: the lowered graph did not compile ({type(err).__name__}: {err}); this graph runs "
                      "the routing ops instead (same results, slower on the CPU)", RuntimeWarning, stacklevel=2)
        lowered = None
    if lowered is None:
        compiled = compile_fx(gm, example_inputs)
        return sites.wrap(compiled) if names else compiled
    extra = lowered[1]
    with_ops = _Lazy(gm)

    def run(*args):
        if record.active() or restricting() or routing_values(cfg.policy, cfg.max_budget_tokens,
                                                               cfg.score) != traced_under:
            return with_ops(*args)  # the host's part: recorded events, resident-only routing, other policies
        return in_graph(*args, *extra)

    return sites.wrap(run, slots=extra[-1])


def _in_graph(gm, example_inputs, sites):
    """(gm lowered for inductor (passes/lower.py), the tables and slots tensors it takes after gm's inputs), or None:
    the CPU only for now (the slots are written from the host before each call; on CUDA that copy would have to stay
    outside captured graphs: not done, nor measured), inference only (the ops' gradients are the ops' own), static
    routed shapes."""
    from moe_spec_compile.passes.graph_utils import meta_val
    from moe_spec_compile.passes.lower import TABLES, in_graph

    devices = {meta_val(n.args[0]).device for n in gm.graph.nodes if n.target is torch.ops.moespec.budget_topk.default}
    if devices != {torch.device("cpu")} or (torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)):
        return None
    from .budget import tables

    tabs = tables(torch.device("cpu"))
    slots = torch.zeros(len(sites.names), dtype=torch.int64)
    graph = in_graph(gm, tabs, slots)
    if graph is None:
        return None
    return graph, [*(tabs[k] for k in TABLES), slots]


class _Lazy:
    """gm (with the routing ops) compiled by inductor at its first call, on that call's inputs."""

    def __init__(self, gm):
        self.gm, self.fn = gm, None

    def __call__(self, *args):
        if self.fn is None:
            from torch._inductor.compile_fx import compile_fx

            self.fn = compile_fx(self.gm, list(args))
        return self.fn(*args)


# Past dynamo's recompile limit a frame runs eagerly without a word, and so without its budget: shared code
# such as transformers' deprecation wrapper around every forward (5.24) gets one cache entry per wrapped
# function and shape, 8 by default. Raised once the backend is in use (tests/test_backend_families.py).
MIN_RECOMPILE_LIMIT = 64


def allow_recompiles(n: int) -> None:
    """Raise dynamo's per-code-object recompile limit to at least n (never lowers it)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < n:
        setattr(cfg, name, n)


def _moespec_callbacks(model):
    """The objects dynamo wraps around `model`'s backend, outermost first (``_torchdynamo_orig_backend``,
    ``compiler_fn``, ``__wrapped__``, a partial's ``func``)."""
    ctx = getattr(model, "dynamo_ctx", None)
    todo, seen = [getattr(ctx, "callback", None)], set()
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        todo += [getattr(obj, a, None) for a in ("_torchdynamo_orig_backend", "compiler_fn", "__wrapped__", "func")]


def is_moespec_compiled(model) -> bool:
    """Was `model` made by ``torch.compile(..., backend="moespec")`` (by name, the function, or a partial of it)?
    A plain module, or one compiled with another backend, is not."""
    return any(obj is moespec_backend or getattr(obj, "compiler_name", None) == "moespec"
               for obj in _moespec_callbacks(model))


def moespec_options(model) -> dict | None:
    """The options `model` was compiled with by ``torch.compile(..., backend="moespec", options=...)`` ({} when
    none were given), or None when it is not moespec-compiled or they cannot be found."""
    for obj in _moespec_callbacks(model):
        if getattr(obj, "compiler_name", None) == "moespec" and isinstance(getattr(obj, "kwargs", None), dict):
            return dict(obj.kwargs.get("options") or {})
    return None


def _note_no_moe(gm, example_inputs) -> None:
    """Warn once per model that holds no MoE-like module at all (a graph piece of a MoE model after a
    graph break has no router either; its model does, so it stays quiet)."""
    from .naming import root_of

    params = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]
    root = root_of(params[0]) if params else None
    if root is None or id(root) in _warned_no_moe:
        return
    _warned_no_moe.add(id(root))
    if any(re.search(r"(moe|expert|router|mixtral|sparse)", type(m).__name__, re.I) for m in root.modules()):
        return
    warnings.warn(f"moespec: no MoE block found in {type(root).__name__}; it compiles unchanged "
                  "(msc.explain(model, *args) shows what was looked at)", stacklevel=3)


class collect_reports:
    """Collect the BlockReports of every graph compiled inside the `with` block (used by explain)."""

    def __enter__(self):
        self.reports = []
        _reports.sinks.append(self.reports)
        return self.reports

    def __exit__(self, *exc):
        _reports.sinks.remove(self.reports)
