"""msc.explain(model, *example_args): which MoE blocks the backend finds, rewrites or declines, and why.

compile with the moespec backend (eager inner) -> run once under record_experts -> one row per block

explain's tracing is kept apart from the caller's own compiles: it runs in an isolated dynamo region
(torch.compile(isolate_recompiles=True)), so it neither counts against nor fills the recompile limit
of the model's code, and its cache entries are invalidated afterwards. A later
``torch.compile(model, backend="moespec", options={"budget": C})`` compiles as if explain never ran.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field, replace

import torch

from .backend import collect_reports, moespec_backend
from .passes.pipeline import _ATTENTION
from .record import record_experts

__all__ = ["ExplainReport", "explain"]


@dataclass
class ExplainReport:
    blocks: list = field(default_factory=list)  # passes.BlockReport: name, num_experts, top_k, router, ...

    def table(self) -> str:
        head = ("block", "experts", "top-k", "router", "budgeted", "experts compute", "reason")
        rows = [head] + [(b.name, str(b.num_experts), str(b.top_k), b.router, "yes" if b.rewritten else "no",
                          b.experts, b.reason or "-") for b in self.blocks]
        if any(b.parallel for b in self.blocks):  # under torchrun: what this rank holds and runs
            rows = [r + (b,) for r, b in zip(rows, ["parallel"] + [b.parallel or "-" for b in self.blocks])]
            head = rows[0]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def explain(model: torch.nn.Module, *example_args, options: dict | None = None, **example_kwargs) -> ExplainReport:
    """Compile `model` with the moespec backend (inner eager) and run it once on the example inputs.

    A graph that dynamo reuses for several layers (after a graph break) is reported once per layer:
    the layers that ran are taken from the recorded expert events."""
    opts = {**(options or {}), "inner": "eager"}
    # A fresh backend object: dynamo must compile anew (a cached graph would report nothing).
    backend = functools.partial(moespec_backend, options=opts)
    with _isolated_compile(model, backend) as compiled, collect_reports() as reports, record_experts() as rec, \
            torch.no_grad():
        compiled(*example_args, **example_kwargs)
    by_name = {r.name: r for r in reports}
    blocks = list(reports)
    for ev in rec.events:
        if ev.block not in by_name:
            twin = by_name.get(ev.compiled_as)
            if twin is not None:
                by_name[ev.block] = replace(twin, name=ev.block)
                blocks.append(by_name[ev.block])
    # A block whose experts ran in a graph of their own (a graph break) is reported by its router's graph.
    routed = {b.name for b in blocks if b.rewritten}
    blocks = [b for b in blocks if b.rewritten or b.name not in routed]
    blocks = [replace(b, router=b.router + " (attention heads)") if _ATTENTION.search(b.name) else b for b in blocks]
    return ExplainReport(sorted(blocks, key=lambda b: _natural(b.name)))


_ISOLATE = "isolate_recompiles" in inspect.signature(torch.compile).parameters


@contextlib.contextmanager
def _isolated_compile(model, backend):
    """torch.compile(model, backend) whose cache entries stay out of the caller's way (see the module doc).

    Each explain call is a new backend object, so dynamo's backend guard never lets one call reuse another's
    graph; without isolation every call would add a cache entry to the model's code and, after
    ``recompile_limit`` (8) calls, explain would report nothing and the user's own moespec compile would
    fall back to eager without a word. On a torch without ``isolate_recompiles`` the recompile limit is
    raised by the number of entries explain leaves behind instead (entries cannot be removed one by one)."""
    from torch._dynamo import convert_frame

    isolate = _ISOLATE
    before = {id(c): {e.compile_id for e in _entries(c)} for c in _seen_codes(convert_frame)}
    kwargs = {"isolate_recompiles": True} if isolate else {}
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    limit = getattr(cfg, name)
    # explain's own compiles must not stop at a limit the caller's entries already used up
    with cfg.patch(**({} if isolate else {name: limit + max(map(len, before.values()), default=0) + 64})):
        try:
            yield torch.compile(model, backend=backend, **kwargs)
        finally:
            left = _invalidate_new_entries(convert_frame, before)
    if not isolate and left:
        setattr(cfg, name, max(getattr(cfg, name), limit + left))


def _seen_codes(convert_frame) -> list:
    return [c for c in (w() for w in convert_frame.input_codes.seen) if c is not None]


def _entries(code) -> list:
    return torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code)


def _invalidate_new_entries(convert_frame, before: dict) -> int:
    """Invalidate the cache entries compiled since `before` (they could never match again: their backend
    guard names explain's backend object); the most entries any one code object gained."""
    from torch._dynamo.guards import DeletedGuardManagerWrapper

    most = 0
    for code in _seen_codes(convert_frame):
        old = before.get(id(code), set())
        new = [e for e in _entries(code) if e.compile_id not in old]
        most = max(most, len(new))
        for entry in new:
            extra = getattr(entry.guard_manager, "extra_state", None)
            if extra is not None:
                extra.invalidate(entry, DeletedGuardManagerWrapper("compiled by msc.explain, which is done"))
    return most


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.replace(".", " ").split()]
