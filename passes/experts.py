"""Experts rewrite: replace an experts region with moespec::fused_experts, once the numbers agree.

region params -> candidate layouts (which tensor is gate/up/down, transposed or not, biases,
activation) -> each candidate checked against the region's own output on the example inputs ->
the first that matches replaces the region: fused_experts(hidden, ids, weights, w_gate_up, w_down)

Source patterns (all reached through the region found by discovery):
    transformers experts: gate_up_proj [E, 2I, H] (or [E, H, 2I]), down_proj [E, H, I] (or [E, I, H]),
        optional biases, grouped_mm / batched_mm implementations; GPT-OSS interleaved clamped SwiGLU
    gpt-fast: w1, w3 [E, I, H], w2 [E, H, I] gathered by ids, combined by einsum with the weights
    ModuleList of per-expert modules with 2-D Linear weights (gate/up/down or w1/w3/w2)
A candidate that does not reproduce the model's numbers is never used: the block is declined.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_spec_compile.ops import ACTIVATIONS, fused_experts_torch

from .discover import Experts, shape_source
from .graph_utils import call, fn_name, meta_val, shape

_GATE = re.compile(r"(^|_)(w1|gate|wi_0|gate_proj)($|_)")
_UP = re.compile(r"(^|_)(w3|up|wi_1|up_proj)($|_)")
_DOWN = re.compile(r"(^|_)(w2|down|wo|down_proj)($|_)")


@dataclass
class Layout:
    """How to build fused_experts' weights from the region's tensors. Each weight is a recipe:
    ("node", node, transpose) uses a graph tensor (as a view); ("const", tensor) a tensor built once."""

    gate_up: tuple
    down: tuple
    b_gate_up: tuple | None
    b_down: tuple | None
    activation: str
    interleaved: bool
    alpha: float = 1.702
    limit: float = 7.0

    def describe(self) -> str:
        parts = [self.activation + (" interleaved" if self.interleaved else "")]
        if self.b_gate_up is not None:
            parts.append("biases")
        if self.gate_up[0] == "const":
            parts.append("weights stacked once at compile time")
        return ", ".join(parts)


def _leaf(node: fx.Node) -> tuple[int | None, str]:
    """(expert index or None, parameter role name) from a placeholder's dynamo source."""
    ga = node.meta.get("grapharg")
    src = ga.source.name if ga is not None and hasattr(ga, "source") else str(node.target)
    keys = re.findall(r"\['([^']+)'\]|\.(\w+)", src)
    names = [a or b for a, b in keys]
    index = next((int(n) for n in reversed(names) if n.isdigit()), None)
    role = [n for n in names if not n.isdigit() and n not in ("weight", "_parameters", "_modules", "_buffers", "self")]
    leaf = role[-1] if role else src
    if names and names[-1] == "bias":
        leaf += "_bias"
    return index, leaf


def _recipe_value(recipe, tensor_of):
    if recipe is None:
        return None
    if recipe[0] == "const":
        return recipe[1]
    t = tensor_of(recipe[1])
    return t.transpose(1, 2) if recipe[2] else t


def _activations(region: set[fx.Node]) -> tuple[list[str], float, float]:
    names = {fn_name(n) for n in region}
    alpha, limit = 1.702, 7.0
    for n in region:
        if fn_name(n) == "clamp" and isinstance(n.kwargs.get("max"), float):
            limit = n.kwargs["max"]
        if fn_name(n) == "sigmoid" and fn_name(n.args[0]) == "mul":
            consts = [a for a in n.args[0].args if isinstance(a, float)]
            alpha = consts[0] if consts else alpha
    order = []
    if "clamp" in names and "sigmoid" in names:
        order.append("swiglu_clamp")
    if "silu" in names or "sigmoid" in names:
        order.append("silu")
    if "gelu" in names:
        gelus = [n for n in region if fn_name(n) == "gelu"]
        tanh = any(n.kwargs.get("approximate") == "tanh" for n in gelus)
        order += ["gelu_tanh", "gelu"] if tanh else ["gelu", "gelu_tanh"]
    if "relu" in names:
        order.append("relu")
    return order + [a for a in ACTIVATIONS if a not in order], alpha, limit


def _stacked_3d(params, tensor_of, e: int, h: int):
    """Yield (gate_up recipe, down recipe, I) for stacked 3-D expert weights."""
    three = [p for p in params if tensor_of(p).dim() == 3 and tensor_of(p).shape[0] == e]

    def orient(p, rows, cols):  # want a [E, rows, cols] view
        s = tuple(tensor_of(p).shape[1:])
        out = []
        if s == (rows, cols):
            out.append(("node", p, False))
        if s == (cols, rows):
            out.append(("node", p, True))
        return out

    if len(three) == 2:
        for gu, dn in itertools.permutations(three):
            s = tensor_of(gu).shape
            for two_i in {s[1], s[2]} - {h} or {h}:
                if two_i % 2:
                    continue
                for r1 in orient(gu, two_i, h):
                    for r2 in orient(dn, h, two_i // 2):
                        yield r1, r2, two_i // 2
    elif len(three) == 3:
        named = sorted(three, key=lambda p: (0 if _GATE.search(_leaf(p)[1]) else 1 if _UP.search(_leaf(p)[1]) else 2))
        perms = [tuple(named)] + [q for q in itertools.permutations(three) if q != tuple(named)]
        for g, u, d in perms:
            ti = tensor_of(g)
            for i in {ti.shape[1], ti.shape[2]} - {h} or {h}:
                for rg in orient(g, i, h):
                    for ru in orient(u, i, h):
                        for rd in orient(d, h, i):
                            w = torch.cat([_recipe_value(rg, tensor_of), _recipe_value(ru, tensor_of)], dim=1)
                            yield ("const", w.contiguous()), rd, i


def _module_list(params, tensor_of, h: int):
    """Yield (gate_up, down, I) for per-expert 2-D Linear weights grouped by expert index."""
    per: dict[int, dict[str, torch.Tensor]] = {}
    for p in params:
        index, leaf = _leaf(p)
        t = tensor_of(p)
        if index is None or t.dim() != 2 or leaf.endswith("_bias"):
            continue
        role = "gate" if _GATE.search(leaf) else "up" if _UP.search(leaf) else "down" if _DOWN.search(leaf) else None
        if role is None:
            return
        per.setdefault(index, {})[role] = t
    if not per or sorted(per) != list(range(len(per))) or any(len(v) != 3 for v in per.values()):
        return
    gate = torch.stack([per[i]["gate"] for i in range(len(per))])  # [E, I, H] (nn.Linear: [out, in])
    up = torch.stack([per[i]["up"] for i in range(len(per))])
    down = torch.stack([per[i]["down"] for i in range(len(per))])  # [E, H, I]
    if gate.shape[2] != h or down.shape[1] != h:
        return
    yield ("const", torch.cat([gate, up], dim=1).contiguous()), ("const", down.contiguous()), gate.shape[1]


def _bias_options(params, tensor_of, e: int, h: int, i: int):
    two = [p for p in params if tensor_of(p).dim() == 2 and tuple(tensor_of(p).shape) in ((e, 2 * i), (e, h))]
    b_gu = [("node", p, False) for p in two if tensor_of(p).shape[1] == 2 * i]
    b_dn = [("node", p, False) for p in two if tensor_of(p).shape[1] == h]
    if b_gu and b_dn:
        for a, b in itertools.product(b_gu, b_dn):
            if a[1] is not b[1]:
                yield a, b
    yield None, None


def identify(experts: Experts, values: dict, tensor_of, num_experts: int, k: int) -> Layout | str:
    """The layout whose fused_experts output matches the region's own output on the example inputs."""
    hidden = values[experts.hidden]
    ids, weights, expected = values["ids"], values["weights"], values[experts.output]
    h = hidden.shape[-1]
    x2 = hidden.reshape(-1, h)
    ids2, w2 = ids.reshape(-1, k), weights.reshape(-1, k)
    if ids2.shape[0] != x2.shape[0] or expected.numel() != x2.numel():
        return "the experts' inputs and output do not line up token by token"
    acts, alpha, limit = _activations(experts.region)
    tol = (1e-3 if expected.dtype == torch.float32 else 3e-2) * max(1.0, expected.float().abs().max().item())
    candidates = itertools.chain(_stacked_3d(experts.params, tensor_of, num_experts, h),
                                 _module_list(experts.params, tensor_of, h))
    best = None
    for gate_up, down, i in candidates:
        for b_gu, b_dn in _bias_options(experts.params, tensor_of, num_experts, h, i):
            for act in acts:
                for inter in (False, True) if act == "swiglu_clamp" or b_gu else (False,):
                    layout = Layout(gate_up, down, b_gu, b_dn, act, inter, alpha, limit)
                    got = fused_experts_torch(
                        x2, ids2, w2, _recipe_value(gate_up, tensor_of), _recipe_value(down, tensor_of), act,
                        _recipe_value(b_gu, tensor_of), _recipe_value(b_dn, tensor_of), inter, alpha, limit)
                    err = (got.float().reshape(-1) - expected.float().reshape(-1)).abs().max().item()
                    if err <= tol:
                        return layout
                    best = err if best is None else min(best, err)
    if best is None:
        return "no expert weight layout moespec knows fits the experts' tensors"
    return f"no known expert layout reproduces the experts' output (closest max error {best:.3g})"


def _materialize(gm: fx.GraphModule, fake_mode, recipe, name: str):
    if recipe is None:
        return None
    if recipe[0] == "const":
        attr = f"_moespec_{name}"
        gm.register_buffer(attr, recipe[1])
        node = gm.graph.get_attr(attr)
        node.meta["val"] = node.meta["example_value"] = fake_mode.from_tensor(recipe[1], static_shapes=True)
        return node
    node = recipe[1]
    if recipe[2]:
        return call(gm.graph, fake_mode, "transpose", (node, 1, 2), method=True)
    return node


def rewrite(gm: fx.GraphModule, fake_mode, experts: Experts, layout: Layout, ids: fx.Node, weights: fx.Node,
            k: int, impl: str, name: str) -> fx.Node:
    """Insert fused_experts before the region's output, reroute its users; the region becomes dead code."""
    g = gm.graph
    out = experts.output
    h = shape(experts.hidden)[-1]
    with g.inserting_before(out):
        x = call(g, fake_mode, "reshape", (experts.hidden, -1, h), method=True)
        ids2 = call(g, fake_mode, "reshape", (ids, -1, k), method=True)
        w2 = call(g, fake_mode, "reshape", (weights, -1, k), method=True)
        wgu = _materialize(gm, fake_mode, layout.gate_up, name + "_w_gate_up")
        wdn = _materialize(gm, fake_mode, layout.down, name + "_w_down")
        bgu = _materialize(gm, fake_mode, layout.b_gate_up, name + "_b_gate_up")
        bdn = _materialize(gm, fake_mode, layout.b_down, name + "_b_down")
        fused = call(g, fake_mode, torch.ops.moespec.fused_experts.default,
                     (x, ids2, w2, wgu, wdn, layout.activation, bgu, bdn, layout.interleaved,
                      float(layout.alpha), float(layout.limit), impl))
        like = x if len(shape(out)) == 2 else shape_source(experts.hidden, shape(out))  # checked by discovery
        res = call(g, fake_mode, "view_as", (fused, like), method=True)
        dtype = meta_val(out).dtype
        if meta_val(res).dtype != dtype:
            res = call(g, fake_mode, "to", (res, dtype), method=True)
    out.replace_all_uses_with(res)
    for n in reversed(list(g.nodes)):  # in-place ops (index_add_, setitem) would survive dead-code elimination
        if n in experts.region and not n.users:
            g.erase_node(n)
    return ids2
