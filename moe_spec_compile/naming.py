"""Global names for MoE blocks seen in graph pieces.

router weight -> owning module -> its path from the outermost module ("model.layers.3.mlp")

Dynamo names modules relative to the frame it compiles: after a graph break the frame's `self` is
a decoder layer, not the model, so the path alone says "mlp". One scan of the live modules maps each
parameter to its full path; the map is cached and rebuilt when a parameter is missing from it.
"""

from __future__ import annotations

import gc
import warnings

import torch

_names: dict[int, str] = {}
_by_ptr: dict[int, str] = {}
_roots: dict[int, torch.nn.Module] = {}  # id(param) -> the outermost module holding it


def _is_module(obj) -> bool:
    try:
        return isinstance(obj, torch.nn.Module)
    except ReferenceError:  # a dead weakref proxy
        return False


def _rebuild() -> None:
    parent: dict[int, tuple[torch.nn.Module, str]] = {}
    owners: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some lazy modules warns
        modules = [obj for obj in gc.get_objects() if _is_module(obj)]
    for obj in modules:
        if True:
            for name, child in obj._modules.items():
                if child is not None:
                    parent[id(child)] = (obj, name)
            for name, p in obj._parameters.items():
                if p is not None:
                    owners.append((obj, name, p))
    _names.clear()
    _by_ptr.clear()
    _roots.clear()
    for module, name, p in owners:
        parts, m = [name], module
        seen = set()
        while id(m) in parent and id(m) not in seen:
            seen.add(id(m))
            m, child_name = parent[id(m)]
            parts.append(child_name)
        _names[id(p)] = ".".join(q for q in reversed(parts) if q != "_orig_mod")  # torch.compile's wrapper
        _roots[id(p)] = m
        if p.device.type != "meta":
            _by_ptr.setdefault(p.data_ptr(), _names[id(p)])


def root_of(p: torch.Tensor) -> torch.nn.Module | None:
    if id(p) not in _roots:
        _rebuild()
    return _roots.get(id(p))


def param_name(p: torch.Tensor) -> str | None:
    if id(p) not in _names:
        _rebuild()
    return _names.get(id(p))


def _block_of(full: str) -> str:
    """"model.layers.0.mlp.gate.weight" -> "model.layers.0.mlp" (the router's parent block)."""
    from moe_spec_compile.passes.graph_utils import parent_block

    return parent_block(full.rsplit(".", 1)[0]) or "<top>"


def block_of_weight(weight: torch.Tensor, fallback: str) -> str:
    """The block a router weight belongs to, looked up at run time: one dynamo graph serves every
    layer of a graph-broken model, so the name baked in at compile time may be another layer's."""
    ptr = weight.data_ptr()
    if ptr not in _by_ptr:
        _rebuild()
        _by_ptr.setdefault(ptr, "")  # a miss stays a miss: no module scan on every recorded pass
    full = _by_ptr.get(ptr)
    return _block_of(full) if full else fallback


def block_namer():
    """A callable (router, tensor_of) -> global block name or None, for run_passes."""

    def name(router, tensor_of):
        t = tensor_of(router.weight) if router.weight is not None else None
        full = param_name(t) if isinstance(t, torch.nn.Parameter) else None
        return _block_of(full) if full else None

    return name
