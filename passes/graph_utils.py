"""Small helpers over dynamo FX graphs: op matching, shapes, module scopes, metadata on new nodes."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable

import torch
import torch.fx as fx

class Declined(Exception):
    """A pass leaves something alone; `reason` says why (shown by msc.explain)."""

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else "declined"


def count(key: str, n: int = 1) -> None:
    """Count what the passes did, in torch._dynamo.utils.counters["moespec"] (tests and tlparse read it)."""
    from torch._dynamo.utils import counters

    counters["moespec"][key] += n


# Ops that only move, view or cast a tensor: a value seen through them is the same value.
VIEW_METHODS = {"to", "float", "double", "half", "bfloat16", "type", "view", "reshape", "contiguous", "clone", "detach"}


def fn_name(node: fx.Node) -> str:
    """A plain name for what a node calls: 'topk', 'softmax', 'linear', 'add', ... ('' for others)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return ""
    t = node.target
    if t in (operator.add, operator.iadd):
        return "add"
    if t in (operator.mul, operator.imul):
        return "mul"
    if t in (operator.truediv, operator.itruediv):
        return "div"
    if t is operator.getitem:
        return "getitem"
    if t is operator.matmul:
        return "matmul"
    if t is operator.invert:
        return "invert"
    name = getattr(t, "__name__", "") or ""
    if isinstance(t, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(t)
    return name


def meta_val(node: fx.Node):
    """The node's fake value: "val" (aot, our own nodes) or "example_value" (dynamo's graphs)."""
    v = node.meta.get("val")
    return node.meta.get("example_value") if v is None else v


def val(node) -> torch.Tensor | None:
    v = meta_val(node) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def shape(node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if v is not None else None


def arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def scope(node: fx.Node) -> str:
    """The innermost module path of a node, e.g. "L['self'].model.layers.0.mlp.experts" ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def scope_class(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    cls = list(stack.values())[-1][1]
    return cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))


def in_scope(node: fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(p == path for p, _ in stack.values())


def clean_path(path: str) -> str:
    """"L['self'].model.layers.0.mlp" -> "model.layers.0.mlp"."""
    for prefix in ("L['self'].", "L['self']", "L['mod'].", "L['mod']"):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def _closure(nodes: Iterable[fx.Node], step) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        for nxt in step(stack.pop()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


_ROUTER_LEAF = re.compile(r"(router|gate|gating)$", re.IGNORECASE)
_MOE_NAME = re.compile(r"(router|gate|gating|moe|expert)", re.IGNORECASE)


def parent_block(module_path: str) -> str:
    """"model.layers.0.mlp.gate" -> "model.layers.0.mlp": a router module's MoE block (else the path itself)."""
    head, _, leaf = module_path.rpartition(".")
    return head if head and _ROUTER_LEAF.search(leaf) else module_path


def looks_like_moe(node: fx.Node) -> bool:
    """The node sits in a module whose path or class names a router, gate, MoE block or experts."""
    return bool(_MOE_NAME.search(scope(node) + scope_class(node)))


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    return _closure(nodes, lambda n: n.all_input_nodes)


def descendants(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    return _closure(nodes, lambda n: n.users)


def external_inputs(region: set[fx.Node]) -> list[fx.Node]:
    out: dict[fx.Node, None] = {}
    for n in region:
        for a in n.all_input_nodes:
            if a not in region:
                out[a] = None
    return list(out)


def region_outputs(region: set[fx.Node]) -> list[fx.Node]:
    return [n for n in region if any(u not in region for u in n.users)]


def fake_mode_of(gm: fx.GraphModule):
    for n in gm.graph.nodes:
        v = meta_val(n)
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    return None


def set_meta(node: fx.Node, fake_mode) -> None:
    """Compute node.meta["val"] by running the node's target on its inputs' fake values."""

    def to_val(a):
        return meta_val(a) if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(node.args, to_val)
    kwargs = fx.node.map_aggregate(node.kwargs, to_val)
    with fake_mode:
        if node.op == "call_function":
            out = node.target(*args, **kwargs)
        else:
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
    node.meta["val"] = node.meta["example_value"] = out


def call(graph: fx.Graph, fake_mode, target, args, kwargs=None, method: bool = False) -> fx.Node:
    node = graph.call_method(target, args, kwargs or {}) if method else graph.call_function(target, args, kwargs or {})
    set_meta(node, fake_mode)
    return node
