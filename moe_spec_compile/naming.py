"""Global names for MoE blocks seen in graph pieces, and the routing sites of each compiled graph.

parameter -> its path from the outermost module that holds it ("model.layers.3.mlp.gate.weight")
compiled graph's call -> its routing sites' budget slots (from the router weights among its inputs) -> the ops

Dynamo names modules relative to the frame it compiles: after a graph break the frame's `self` is a decoder
layer, not the model, so the path alone says "mlp". Names come from the modules that are running: the Python
stack of the call being compiled or run holds the user's model (every nn.Module ``self`` and bound method on
it), and `register(model)` names one explicitly. Among several modules holding a parameter the longest path
(the outermost module) wins. Nothing scans the heap; a parameter never seen on a stack keeps the name dynamo
gave it at compile time.

One dynamo graph may serve every layer of a graph-broken model. The routing ops therefore carry neither block
names nor router weights: the backend wraps each compiled graph so that, before it runs, the router weights
among its inputs pick each site's slot (cached by data pointer: metadata, no device read), and the ops read
their slot by site number (`current_slot`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref

import torch

__all__ = ["register", "param_name", "root_of", "root_of_weight", "block_of_weight", "block_namer", "Sites",
           "current_slot", "site_names"]

_names: dict[int, tuple[weakref.ref, str, weakref.ref]] = {}  # id(param) -> (param, full name, root module)
_by_ptr: dict[int, str] = {}  # data pointer -> full name (a graph's inputs are plain tensors at run time)
_root_by_ptr: dict[int, weakref.ref] = {}  # data pointer -> the root module that named it


def _clean(name: str) -> str:
    return ".".join(q for q in name.split(".") if q != "_orig_mod")  # torch.compile's wrapper


def register(root: torch.nn.Module) -> None:
    """Name every parameter of `root` by its path from `root` (kept where an outer module gave a longer one)."""
    ref = weakref.ref(root)
    for name, p in root.named_parameters(remove_duplicate=False):
        name = _clean(name)
        old = _lookup(p)
        if old is not None and len(old[1]) >= len(name):
            continue
        _names[id(p)] = (weakref.ref(p), name, ref)
        if p.device.type != "meta":
            _by_ptr[p.data_ptr()] = name
            _root_by_ptr[p.data_ptr()] = ref


def _lookup(p: torch.Tensor):
    entry = _names.get(id(p))
    if entry is None or entry[0]() is not p:  # a dead parameter's id reused
        return None
    return entry


def _from_stack() -> None:
    """Register the modules running on this thread's Python stack (`self` of every frame, bound methods)."""
    seen: set[int] = set()
    frame = sys._getframe(1)
    while frame is not None:
        for value in frame.f_locals.values():
            obj = getattr(value, "__self__", value)  # a bound method: its module
            if isinstance(obj, torch.nn.Module) and id(obj) not in seen:
                seen.add(id(obj))
                register(getattr(obj, "_orig_mod", obj))
        frame = frame.f_back


def param_name(p: torch.Tensor) -> str | None:
    if _lookup(p) is None:
        _from_stack()
    entry = _lookup(p)
    return entry[1] if entry else None


def root_of(p: torch.Tensor) -> torch.nn.Module | None:
    if _lookup(p) is None:
        _from_stack()
    entry = _lookup(p)
    return entry[2]() if entry else None


def root_of_weight(weight: torch.Tensor) -> torch.nn.Module | None:
    """The model a router weight belongs to (a parameter, or a plain tensor by its data pointer), or None."""
    if isinstance(weight, torch.nn.Parameter):
        return root_of(weight)
    ref = _root_by_ptr.get(weight.data_ptr())
    return ref() if ref is not None else None


def _block_of(full: str) -> str:
    """"model.layers.0.mlp.gate.weight" -> "model.layers.0.mlp" (the router's parent block)."""
    from moe_spec_compile.passes.graph_utils import parent_block

    return parent_block(full.rsplit(".", 1)[0]) or "<top>"


def block_of_weight(weight: torch.Tensor, fallback: str | None) -> str | None:
    """The block a router weight belongs to: by the parameter itself, else by its data pointer (a plain tensor
    among a graph's inputs), else by the stack's modules, else the compile-time name `fallback`."""
    if isinstance(weight, torch.nn.Parameter):
        full = param_name(weight)
    else:
        full = _by_ptr.get(weight.data_ptr())
        if full is None:
            _from_stack()
            full = _by_ptr.get(weight.data_ptr())
    return _block_of(full) if full else fallback


def block_namer():
    """A callable (router, tensor_of) -> global block name or None, for run_passes."""

    def name(router, tensor_of):
        t = tensor_of(router.weight) if router.weight is not None else None
        return block_of_weight(t, None) if t is not None else None

    return name


# --- routing sites of a compiled graph --------------------------------------------------------------------

class _Current(threading.local):
    def __init__(self):
        self.slots: tuple[int, ...] = ()
        self.names: tuple[str, ...] = ()  # compile-time block names, by site
        self.held: tuple = ()  # by site: (first, count) of the experts this rank holds, or None (all of them)


_current = _Current()


class Sites:
    """The routing sites of one compiled graph: for site i, the graph input holding its router weight (or None),
    the block name it was compiled for and the experts this rank holds ((first, count) under expert parallelism,
    else None). `bind(args)` -> the slots of this call (cached by data pointers)."""

    def __init__(self, inputs: list[int | None], names: list[str], spec: int, held: list | None = None):
        self.inputs, self.names, self.spec = inputs, tuple(names), spec
        self.held = tuple(held) if held is not None else (None,) * len(self.names)
        self._cache: dict[tuple[int, ...], tuple] = {}  # data pointers -> (slots, weak refs of the weights)
        self._written = None  # the slots tuple last copied into wrap's slots tensor

    def slots(self, args) -> tuple[int, ...]:
        from .budget import slot_of

        weights = [args[i] if i is not None else None for i in self.inputs]
        key = tuple(w.data_ptr() if w is not None else 0 for w in weights)
        hit = self._cache.get(key)
        if hit is not None and all(r is None or r() is w for r, w in zip(hit[1], weights)):
            return hit[0]  # the same tensors (a freed model's addresses reused by another miss here)
        slots = tuple(slot_of(block_of_weight(w, name), self.spec, root_of_weight(w)) if w is not None
                      else slot_of(name, self.spec) for w, name in zip(weights, self.names))
        self._cache[key] = (slots, tuple(weakref.ref(w) if w is not None else None for w in weights))
        return slots

    def wrap(self, fn, slots: torch.Tensor | None = None):
        """fn(*args) with this graph's slots current while it runs (dynamo calls a backend's result unboxed).
        slots: a graph input [sites] that holds them on the device too (a graph with its routing traced in),
        rewritten only when they change."""

        def run(*args):
            with self.bound(args):
                if slots is not None and self._written is not _current.slots:
                    slots.copy_(torch.tensor(_current.slots, dtype=torch.int64))
                    self._written = _current.slots
                return fn(*args)

        return run

    @contextlib.contextmanager
    def bound(self, args):
        saved = _current.slots, _current.names, _current.held
        _current.slots, _current.names, _current.held = self.slots(args), self.names, self.held
        try:
            yield
        finally:
            _current.slots, _current.names, _current.held = saved


def current_slot(site: int, spec: int) -> tuple[int, str]:
    """(slot, compile-time block name) of routing site `site` in the graph running now; an op called on its own
    (outside a compiled graph) gets the slot of block "<op>" under its spec."""
    from .budget import slot_of

    if 0 <= site < len(_current.slots):
        return _current.slots[site], _current.names[site]
    return slot_of("<op>", spec), "<op>"


def site_names(site: int) -> tuple[str, str, tuple[int, int] | None]:
    """(block name, compile-time block name, (first, count) of the experts this rank holds or None) of routing site
    `site` in the graph running now (for recorded events)."""
    from .budget import slot_name

    if 0 <= site < len(_current.slots):
        return slot_name(_current.slots[site]), _current.names[site], _current.held[site]
    return "<op>", "<op>", None
