"""Experts rewrite: replace an experts region with moespec::fused_experts(_list), reading the model's own
parameters, once structure names one layout and the region alone confirms it numerically.

region params -> candidates from structure (names, shapes, activation and slicing ops in the region)
-> the region run alone in fp32 on synthetic tokens, against each candidate -> exactly one agrees
-> fused_experts(hidden, ids, weights, <the model's own weight tensors>) replaces the region

Source patterns (all reached through the region found by discovery):
    transformers experts: gate_up_proj [E, 2I, H] (or [E, H, 2I]), down_proj [E, H, I] (or [E, I, H]),
        optional biases, grouped_mm / batched_mm implementations; GPT-OSS interleaved clamped SwiGLU
    gpt-fast: w1, w3 [E, I, H], w2 [E, H, I] gathered by ids        -> fused_experts(..., w_up=w3)
    ModuleList of per-expert modules with 2-D Linear weights         -> fused_experts_list(gate[], up[], down[])
No weight is copied, so later weight updates are seen; when no candidate or more than one agrees, the
block is declined (never a guess).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_spec_compile.checks import ACTIVATIONS
from moe_spec_compile.experts_op import _list_torch, fused_experts_torch

from .discover import Experts, shape_source
from .graph_utils import Declined, call, external_inputs, fn_name, meta_val, shape
from .parallel import local_weight

_GATE = re.compile(r"(^|_)(w1|gate|wi_0|gate_proj)($|_)")
_UP = re.compile(r"(^|_)(w3|up|wi_1|up_proj)($|_)")
_DOWN = re.compile(r"(^|_)(w2|down|wo|down_proj)($|_)")
_GATE_UP = re.compile(r"gate_up|w13|wi$|input_linear|fc1|w_in")


@dataclass
class Layout:
    """Which of the region's weight nodes fused_experts reads. Stacked: gate_up (node, transposed), optional
    up (gate/up apart), down, biases. Listed: per-expert gate/up/down nodes (fused_experts_list)."""

    activation: str
    gate_up: tuple | None = None  # (node, transpose)
    down: tuple | None = None
    up: tuple | None = None
    b_gate_up: fx.Node | None = None
    b_down: fx.Node | None = None
    interleaved: bool = False
    lists: tuple | None = None  # (gate nodes, up nodes, down nodes)
    alpha: float = 1.702
    limit: float = 7.0

    def describe(self) -> str:
        parts = [self.activation + (" interleaved" if self.interleaved else "")]
        if self.b_gate_up is not None:
            parts.append("biases")
        if self.up is not None:
            parts.append("gate and up apart")
        if self.lists is not None:
            parts.append(f"{len(self.lists[0])} listed experts")
        return ", ".join(parts)


def param_leaf(node: fx.Node) -> tuple[int | None, str]:
    """(expert index or None, parameter role name) from a placeholder's dynamo source (a sharded weight's
    ``.to_local()``: its DTensor's)."""
    node = local_weight(node) or node
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


# --- candidates from structure ----------------------------------------------------------------------

def _activations(region: set[fx.Node]) -> tuple[list[str], float, float]:
    """The activations the region's ops allow (one, when the ops name it), with GPT-OSS's alpha and limit."""
    names = {fn_name(n) for n in region}
    alpha, limit = 1.702, 7.0
    for n in region:
        if fn_name(n) == "clamp" and isinstance(n.kwargs.get("max"), float):
            limit = n.kwargs["max"]
        if fn_name(n) == "sigmoid" and fn_name(n.args[0]) == "mul":
            consts = [a for a in n.args[0].args if isinstance(a, float)]
            alpha = consts[0] if consts else alpha
    if "clamp" in names and "sigmoid" in names:
        return ["swiglu_clamp"], alpha, limit
    if "silu" in names or "sigmoid" in names:
        return ["silu"], alpha, limit
    if "gelu" in names:
        tanh = any(n.kwargs.get("approximate") == "tanh" for n in region if fn_name(n) == "gelu")
        return ["gelu_tanh" if tanh else "gelu"], alpha, limit
    if "relu" in names:
        return ["relu"], alpha, limit
    return list(ACTIVATIONS), alpha, limit  # an activation module dynamo did not name: the check decides


def _interleaved(region: set[fx.Node]) -> tuple[bool, ...]:
    """(True,) when the region slices every second column (GPT-OSS's gate = x[..., ::2]), else (False,)."""
    for n in region:
        if fn_name(n) == "getitem" and isinstance(n.args[1], tuple | slice):
            parts = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
            if any(isinstance(p, slice) and p.step == 2 for p in parts):
                return (True,)
    return (False,)


def _orient(t: torch.Tensor, rows: int, cols: int) -> list[bool]:
    """Transpose flags that make a [E, a, b] tensor a [E, rows, cols] view."""
    s = tuple(t.shape[1:])
    return [tr for tr, ok in ((False, s == (rows, cols)), (True, s == (cols, rows))) if ok]


def _stacked(params, tensor_of, e: int, h: int):
    """Yield (gate_up, up, down, I) from stacked 3-D expert weights: two (gate_up + down) or three (w1/w3/w2)."""
    three = [p for p in params if tensor_of(p).dim() == 3 and tensor_of(p).shape[0] == e]
    roles = {p: param_leaf(p)[1] for p in three}
    if len(three) == 2:
        named = sorted(three, key=lambda p: 0 if _GATE_UP.search(roles[p]) else 1)
        for gu, dn in [tuple(named)] + ([tuple(reversed(named))] if not _GATE_UP.search(roles[named[0]]) else []):
            s = tensor_of(gu).shape
            for two_i in sorted({s[1], s[2]} - {h} or {h}):
                if two_i % 2:
                    continue
                for tg in _orient(tensor_of(gu), two_i, h):
                    for td in _orient(tensor_of(dn), h, two_i // 2):
                        yield (gu, tg), None, (dn, td), two_i // 2
    elif len(three) == 3:
        gate = [p for p in three if _GATE.search(roles[p])]
        up = [p for p in three if _UP.search(roles[p])]
        down = [p for p in three if _DOWN.search(roles[p])]
        if not (len(gate) == len(up) == len(down) == 1):
            return  # names do not say which is which: no guessing
        g, u, d = gate[0], up[0], down[0]
        ti = tensor_of(g)
        for i in sorted({ti.shape[1], ti.shape[2]} - {h} or {h}):
            for tg in _orient(ti, i, h):
                for tu in _orient(tensor_of(u), i, h):
                    for td in _orient(tensor_of(d), h, i):
                        if tg == tu:
                            yield (g, tg), (u, tu), (d, td), i


def _listed(params, tensor_of, h: int):
    """Yield ((gate nodes, up nodes, down nodes), I) for per-expert 2-D Linear weights grouped by expert index."""
    per: dict[int, dict[str, fx.Node]] = {}
    for p in params:
        index, leaf = param_leaf(p)
        t = tensor_of(p)
        if index is None or t.dim() != 2 or leaf.endswith("_bias"):
            continue
        role = "gate" if _GATE.search(leaf) else "up" if _UP.search(leaf) else "down" if _DOWN.search(leaf) else None
        if role is None or role in per.setdefault(index, {}):
            return
        per[index][role] = p
    if not per:
        return
    if sorted(per) != list(range(len(per))) or any(len(v) != 3 for v in per.values()):
        raise Declined("the listed experts are not numbered 0..E-1 with one gate, up and down weight each")
    lists = tuple([per[i][r] for i in range(len(per))] for r in ("gate", "up", "down"))
    shapes = {(tuple(tensor_of(g).shape), tuple(tensor_of(u).shape), tuple(tensor_of(d).shape))
              for g, u, d in zip(*lists)}
    if len(shapes) != 1:
        raise Declined(f"the listed experts differ in size ({len(shapes)} different shapes); fused_experts needs "
                       "one size for all")
    (gs, us, ds), = shapes
    if gs != us or gs[1] != h or ds != (h, gs[0]):
        raise Declined(f"listed expert weights {gs}, {us}, {ds} are not gate/up [I, H={h}] and down [H, I]")
    yield lists, gs[0]


def _biases(params, tensor_of, e: int, h: int, i: int):
    """(b_gate_up, b_down) pairs among the region's [E, n] tensors; (None, None) when it has none."""
    two = [p for p in params if tensor_of(p).dim() == 2 and tensor_of(p).shape[0] == e]
    if not two:
        yield None, None
        return
    for a, b in itertools.permutations(two, 2):
        if tensor_of(a).shape[1] == 2 * i and tensor_of(b).shape[1] == h and len(two) == 2:
            yield a, b


def candidates(experts: Experts, tensor_of, e: int) -> list[Layout]:
    h = shape(experts.hidden)[-1]
    acts, alpha, limit = _activations(experts.region)
    out = []
    for gate_up, up, down, i in _stacked(experts.params, tensor_of, e, h):
        for b_gu, b_dn in _biases(experts.params, tensor_of, e, h, i):
            for act, inter in itertools.product(acts, _interleaved(experts.region)):
                out.append(Layout(act, gate_up, down, up, b_gu, b_dn, inter, None, alpha, limit))
    if not out:
        for lists, _i in _listed(experts.params, tensor_of, h):
            out += [Layout(act, lists=lists, alpha=alpha, limit=limit) for act in acts]
    return out


# --- the numeric check on the region alone -----------------------------------------------------------

_LOW = (torch.float16, torch.bfloat16)


def _fp32(a):
    return torch.float32 if a in _LOW else a


def _region_module(experts: Experts) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The experts region as a graph of its own (16-bit dtype constants made fp32); its inputs in order."""
    graph = fx.Graph()
    inputs = external_inputs(experts.region)
    env = {a: graph.placeholder(f"in_{j}") for j, a in enumerate(inputs)}
    order = {n: j for j, n in enumerate(experts.output.graph.nodes)}
    for n in sorted(experts.region, key=order.__getitem__):
        new = graph.node_copy(n, lambda a: env[a])
        new.args = fx.node.map_aggregate(new.args, _fp32)
        new.kwargs = fx.node.map_aggregate(new.kwargs, _fp32)
        env[n] = new
    graph.output(env[experts.output])
    return fx.GraphModule(torch.nn.Module(), graph), inputs


def _concrete(v):
    if isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool):
        return v.node.hint
    return v


def _synthetic(experts: Experts, ids_node, w_node, inputs, tensor_of, e: int, k: int, gen) -> list:
    values = []
    for a in inputs:
        v = meta_val(a)
        if a in (ids_node, w_node, experts.hidden):
            dims = [_concrete(d) for d in v.shape]
            n = max(1, torch.Size(dims).numel() // (k if a is not experts.hidden else dims[-1]))
            if a is ids_node:
                x = torch.rand(n, e, generator=gen).argsort(-1)[:, :k].reshape(dims).to(v.dtype)
            elif a is w_node:
                x = torch.rand(dims, generator=gen) + 0.1
            else:
                x = torch.randn(dims, generator=gen)
            # on the device the graph was traced for: the region may branch on it at trace time (transformers'
            # grouped_mm experts histc int ids on CUDA, float ids on the CPU, which has no int histc)
            values.append(x.to(v.device))
        elif isinstance(v, torch.Tensor):
            t = tensor_of(a)
            if t is None:
                raise Declined(f"the experts read {a.name}, which is neither a weight nor a routing result")
            values.append(t.detach().float() if t.is_floating_point() else t.detach())
        else:
            values.append(_concrete(v))
    return values


def _candidate_out(layout: Layout, x2, ids2, w2, tensor_of):
    def f(node_t):
        if node_t is None:
            return None
        t = tensor_of(node_t[0]).detach().float()
        return t.transpose(1, 2) if node_t[1] else t

    if layout.lists is not None:
        gate, up, down = ([tensor_of(p).detach().float() for p in ws] for ws in layout.lists)
        return _list_torch(x2, ids2, w2, gate, up, down, layout.activation, layout.alpha, layout.limit)
    bias = lambda p: tensor_of(p).detach().float() if p is not None else None  # noqa: E731
    return fused_experts_torch(x2, ids2, w2, f(layout.gate_up), f(layout.down), layout.activation,
                               bias(layout.b_gate_up), bias(layout.b_down), layout.interleaved, layout.alpha,
                               layout.limit, f(layout.up))


def _run_region(module, inputs, values) -> tuple[torch.Tensor, float]:
    """(the region's output in fp32, the relative tolerance to match it with). In fp32 where the region runs
    in fp32; else (a kernel traced in that takes only the model's dtype, as torch._grouped_mm may on a GPU)
    in the dtypes it was traced with, matched at 16-bit precision: a wrong layout is off by O(1) either way."""
    try:
        return module(*values).float(), 1e-4
    except RuntimeError as fp32_err:
        traced = [v.to(meta_val(a).dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for a, v in zip(inputs, values)]
        if all(t is v for t, v in zip(traced, values)):
            raise Declined(f"the experts region does not run on synthetic tokens ({fp32_err})") from fp32_err
        try:
            return module(*traced).float(), 2e-2
        except RuntimeError as err:
            raise Declined(f"the experts region does not run on synthetic tokens ({err})") from err


def identify(experts: Experts, ids_node: fx.Node, w_node: fx.Node, tensor_of, num_experts: int, k: int) -> Layout:
    """The one candidate layout whose fused_experts equals the region run alone (fp32, synthetic tokens)."""
    layouts = candidates(experts, tensor_of, num_experts)
    if not layouts:
        raise Declined("no expert weight layout moespec knows fits the experts' tensors")
    module, inputs = _region_module(experts)
    gen = torch.Generator().manual_seed(0)
    values = _synthetic(experts, ids_node, w_node, inputs, tensor_of, num_experts, k, gen)
    with torch.no_grad():
        expected, rel_tol = _run_region(module, inputs, values)
        by = dict(zip(inputs, values))
        h = by[experts.hidden].shape[-1]
        x2, ids2, w2 = by[experts.hidden].reshape(-1, h), by[ids_node].reshape(-1, k), by[w_node].reshape(-1, k)
        if ids2.shape[0] != x2.shape[0] or expected.numel() != x2.numel():
            raise Declined("the experts' inputs and output do not line up token by token")
        tol = rel_tol * max(1.0, expected.abs().max().item())
        errors = [(_candidate_out(lay, x2, ids2, w2, tensor_of).reshape(-1) - expected.reshape(-1)).abs().max().item()
                  for lay in layouts]
    fits = [lay for lay, err in zip(layouts, errors) if err <= tol]
    if len(fits) > 1:
        raise Declined(f"{len(fits)} expert layouts reproduce the experts' output ({fits[0].describe()}; "
                       f"{fits[1].describe()}): ambiguous, left alone")
    if not fits:
        raise Declined(f"no known expert layout reproduces the experts' output (closest max error {min(errors):.3g})")
    return fits[0]


# --- the rewrite ----------------------------------------------------------------------------------------

def _weight(gm, fake_mode, node_t):
    if node_t is None:
        return None
    node, transpose = node_t
    return call(gm.graph, fake_mode, "transpose", (node, 1, 2), method=True) if transpose else node


def rewrite(gm: fx.GraphModule, fake_mode, experts: Experts, layout: Layout, ids: fx.Node, weights: fx.Node,
            k: int, impl: str) -> fx.Node:
    """Insert fused_experts before the region's output, reroute its users; the region becomes dead code."""
    g = gm.graph
    out = experts.output
    h = shape(experts.hidden)[-1]
    with g.inserting_before(out):
        x = call(g, fake_mode, "reshape", (experts.hidden, -1, h), method=True)
        ids2 = call(g, fake_mode, "reshape", (ids, -1, k), method=True)
        w2 = call(g, fake_mode, "reshape", (weights, -1, k), method=True)
        if layout.lists is not None:
            gate, up, down = (list(ws) for ws in layout.lists)
            fused = call(g, fake_mode, torch.ops.moespec.fused_experts_list.default,
                         (x, ids2, w2, gate, up, down, layout.activation, float(layout.alpha), float(layout.limit),
                          impl))
        else:
            fused = call(g, fake_mode, torch.ops.moespec.fused_experts.default,
                         (x, ids2, w2, _weight(gm, fake_mode, layout.gate_up), _weight(gm, fake_mode, layout.down),
                          layout.activation, layout.b_gate_up, layout.b_down, layout.interleaved, float(layout.alpha),
                          float(layout.limit), impl, _weight(gm, fake_mode, layout.up)))
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
