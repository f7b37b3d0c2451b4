"""Discovery: find each MoE block's router and experts in a dynamo FX graph, or say why not.

topk node -> walk back to the router linear (softmax | sigmoid | neither) -> walk forward to where
ids and weights leave the router -> the experts region those ids feed (module scope + data flow)

Router source patterns matched (each found through views and dtype casts):
    probs = softmax(linear(x, W_r));        w, ids = topk(probs, k)            Mixtral, Qwen, OLMoE, gpt-fast
    s = sigmoid(linear(x, W_r)); sel = (s + bias).masked_fill(group_mask, 0)
    ids = topk(sel, k)[1]; w = s.gather(-1, ids) (/ sum) * scale                DeepSeek-V3
    logits = linear(x, W_r, b); v, ids = topk(logits, k); w = softmax(v)        GPT-OSS, Granite, JetMoE
    logits = linear(x, W_r); v, ids = topk(logits, k); w = sigmoid(v)          sigmoid after top-k
Everything after the top-k (renormalization, scaling) stays the model's own code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .graph_utils import (
    VIEW_METHODS,
    Declined,
    ancestors,
    arg,
    clean_path,
    descendants,
    external_inputs,
    fn_name,
    in_scope,
    meta_val,
    parent_block,
    region_outputs,
    scope,
    shape,
    val,
)

# Ops through which routing results flow between the top-k and the experts (weight post-processing).
_ROUTING_OPS = VIEW_METHODS | {"getitem", "div", "mul", "add", "sub", "sum", "softmax", "sigmoid", "gather",
                               "masked_fill", "where", "truediv", "float", "unsqueeze", "squeeze", "type_as"}


@dataclass
class Router:
    topk: fx.Node
    k: int
    num_experts: int
    x: fx.Node  # [..., E] what the top-k selects on
    scores: fx.Node  # [..., E] probabilities (score_fn "identity") or logits (score_fn "softmax")
    score_fn: str
    kind: str  # "softmax", "sigmoid", "softmax after top-k"
    features: list[str]
    sorted: bool
    linear: fx.Node | None = None  # the router's linear layer
    closure: set[fx.Node] = field(default_factory=set)  # the top-k and the routing ops after it
    ids_exit: fx.Node | None = None  # where the routing result leaves the router
    weights_exit: fx.Node | None = None

    @property
    def weight(self) -> fx.Node | None:
        """The router's weight as the graph receives it (through dtype casts such as DeepSeek's .type())."""
        w = self.linear.args[1] if len(self.linear.args) > 1 else self.linear.kwargs.get("weight")
        return _through_views(w) if isinstance(w, fx.Node) else None

    block_name: str | None = None  # the global name (naming.block_namer), when known

    @property
    def block(self) -> str:
        """The MoE block's module path: the parent of the router module ("model.layers.0.mlp")."""
        return self.block_name or parent_block(clean_path(scope(self.topk))) or "<top>"

    @block.setter
    def block(self, name: str) -> None:
        self.block_name = name


@dataclass
class Experts:
    region: set[fx.Node]
    output: fx.Node  # the one node of the region used outside it: [..., H]
    hidden: fx.Node  # [..., H] the tokens' hidden states the experts read
    params: list[fx.Node]  # weight tensors (placeholders / get_attr) the region reads
    scope: str


def is_topk(node: fx.Node) -> bool:
    return fn_name(node) == "topk"


def _through_views(node: fx.Node) -> fx.Node:
    while fn_name(node) in VIEW_METHODS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _last_dim_ok(node: fx.Node, dim) -> bool:
    s = shape(node)
    return s is not None and dim in (-1, len(s) - 1)


def _check_topk(node: fx.Node) -> tuple[fx.Node, int, int, bool]:
    """(x, k, E, sorted) of a top-k that can be a routing choice: over the last dim, largest, constant k."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    k = arg(node, 1, "k")
    dim = arg(node, 2, "dim", -1)
    largest = arg(node, 3, "largest", True)
    is_sorted = arg(node, 4, "sorted", True)
    if not isinstance(x, fx.Node) or shape(x) is None:
        raise Declined("top-k input has no known shape")
    if not isinstance(k, int) or isinstance(k, bool):
        raise Declined("top-k's k is not a constant")
    if not _last_dim_ok(x, dim) or largest is not True:
        raise Declined("top-k is not over the last dimension with largest=True")
    e = shape(x)[-1]
    if not isinstance(e, int) or e < 2 or not 1 <= k <= e:
        raise Declined(f"top-k over {e} entries with k={k} is not a routing choice")
    return x, k, e, bool(is_sorted)


def _walk_to_linear(x: fx.Node) -> tuple[fx.Node, fx.Node | None, str | None, list[str]]:
    """From the top-k's input back to the router linear: (linear, probs node, "softmax"/"sigmoid"/None, features)."""
    probs, kind, features, cur = None, None, [], x
    for _ in range(64):
        name = fn_name(cur)
        if name == "softmax" and probs is None and _last_dim_ok(cur, arg(cur, 1, "dim", -1)):
            probs, kind = cur, "softmax"
        elif name == "sigmoid" and probs is None:
            probs, kind = cur, "sigmoid"
        elif name == "linear":
            return cur, probs, kind, features
        elif name in VIEW_METHODS:
            pass
        elif name == "add":
            same = [a for a in cur.args if isinstance(a, fx.Node) and shape(a) == shape(cur)]
            if len(same) != 1:
                raise Declined("router scores pass through an add moespec does not understand")
            features.append("bias-corrected selection")
            cur = same[0]
            continue
        elif name == "masked_fill":
            features.append("grouped top-k")
        else:
            raise Declined(f"router scores come from '{name or cur.op}', not a linear -> softmax/sigmoid -> top-k "
                           "chain")
        nxt = cur.args[0] if cur.args else None
        if not isinstance(nxt, fx.Node):
            raise Declined("router scores do not come from a linear layer")
        cur = nxt
    raise Declined("router chain too long")


# Router kinds: how the budget ops score experts. Each takes (x, probs, values) and returns
# (kind, scores node, score_fn) or None when the kind does not apply.
def _probs_before_topk(x, probs, values):
    """softmax(linear) -> top-k (Mixtral, Qwen, OLMoE, gpt-fast); sigmoid(linear) [+ bias] -> top-k (DeepSeek-V3)."""
    return None if probs is None else (_kind_of(probs), probs, "identity")


def _softmax_after_topk(x, probs, values):
    """linear -> top-k -> softmax of the chosen values (GPT-OSS, Granite, JetMoE): score = the full softmax."""
    if probs is None and values is not None and any(fn_name(u) == "softmax" for u in values.users):
        return "softmax after top-k", x, "softmax"
    return None


def _sigmoid_after_topk(x, probs, values):
    """linear -> top-k -> sigmoid of the chosen values: score = the sigmoid of every logit."""
    if probs is None and values is not None and any(fn_name(u) == "sigmoid" for u in values.users):
        return "sigmoid after top-k", x, "sigmoid"
    return None


_ROUTER_KINDS = (_probs_before_topk, _softmax_after_topk, _sigmoid_after_topk)


def _kind_of(probs: fx.Node) -> str:
    return "softmax" if fn_name(probs) == "softmax" else "sigmoid"


def analyze_router(node: fx.Node) -> Router:
    """A Router for a top-k node; raises Declined with the reason it is not a router moespec understands."""
    x, k, e, is_sorted = _check_topk(node)
    linear, probs, _kind, features = _walk_to_linear(x)
    weight = linear.args[1] if len(linear.args) > 1 else linear.kwargs.get("weight")
    if shape(weight) is None or shape(weight)[0] != e:
        raise Declined(f"the router linear's weight {shape(weight)} does not produce {e} expert scores")
    outputs = {u.args[1]: u for u in node.users if fn_name(u) == "getitem"}
    if len(outputs) != len(node.users):
        raise Declined("top-k result used other than by indexing")
    if 1 not in outputs:
        raise Declined("top-k indices are unused")
    for kind_fn in _ROUTER_KINDS:
        found = kind_fn(x, probs, outputs.get(0))
        if found is not None:
            kind, scores, score_fn = found
            return Router(node, k, e, x, scores, score_fn, kind, features, is_sorted, linear=linear)
    raise Declined("top-k on raw logits without a softmax or sigmoid over the chosen values")


def routing_closure(router: Router, stop: set[fx.Node]) -> None:
    """Walk forward from the top-k through weight post-processing; set the exits (or raise Declined)."""
    k = router.k
    lead = val(router.x).numel() // router.num_experts
    closure = {router.topk}
    downstream = descendants([router.topk])
    frontier = list(router.topk.users)
    while frontier:
        n = frontier.pop()
        if n in closure or n in stop or n.op != "call_function" and n.op != "call_method":
            continue
        name = fn_name(n)
        s, v = shape(n), val(n)
        if name not in _ROUTING_OPS or s is None or v is None:
            continue
        if not s or s[-1] not in (k, 1) or v.numel() not in (lead * k, lead):
            continue  # routing values [..., k], or per-token normalizers [..., 1] (sum, + eps)
        if any(a in downstream and a not in closure for a in n.all_input_nodes):
            continue  # mixes routing values with something computed from them outside (a one-hot mask)
        if name == "getitem" and n.args[0] is not router.topk and not isinstance(n.args[1], int | tuple | slice):
            continue
        closure.add(n)
        frontier.extend(n.users)
    # Exits: routing values [..., k] used outside the closure ([..., 1] normalizers are not results).
    exits = [n for n in closure if n is not router.topk and val(n).numel() == lead * k and fn_name(n) != "sum"
             and any(u not in closure for u in n.users)]
    ids = [n for n in exits if not val(n).is_floating_point()]
    weights = [n for n in exits if val(n).is_floating_point()]
    if len(ids) != 1:
        raise Declined(f"routing ids leave the router in {len(ids)} places")
    if len(weights) != 1:
        raise Declined(f"routing weights leave the router in {len(weights)} places")
    if shape(ids[0]) != shape(weights[0]):
        raise Declined(f"routing ids {shape(ids[0])} and weights {shape(weights[0])} differ in shape")
    router.closure, router.ids_exit, router.weights_exit = closure, ids[0], weights[0]


def _is_weight(node: fx.Node, tensor_of) -> bool:
    t = tensor_of(node)
    return isinstance(t, torch.nn.Parameter) or (node.op == "get_attr") or (t is not None and node.op == "placeholder"
                                                                            and t.dim() >= 2 and t.shape[0] > 1
                                                                            and "_parameters" in _source(node))


def _source(node: fx.Node) -> str:
    ga = node.meta.get("grapharg")
    return ga.source.name if ga is not None and hasattr(ga, "source") else ""


def shape_source(hidden: fx.Node, want: tuple) -> fx.Node | None:
    """A node shaped like the experts' output on the hidden states' view chain ([B, S, H] before
    `.view(-1, H)`), for fused_experts' result to take its shape from (no raw SymInts in the graph)."""
    node = hidden
    while node is not None:
        if shape(node) == want:
            return node
        node = node.args[0] if fn_name(node) in VIEW_METHODS and isinstance(node.args[0], fx.Node) else None
    return None


def _add_side_effects(region: set[fx.Node], upstream: set[fx.Node]) -> None:
    """Grow the region by what only it uses: user-less in-place writes that touch it (`out.add_(bias)`,
    `inv_perm[perm] = arange`), and the nodes feeding only those (a bias gathered per token)."""
    graph = next(iter(region)).graph

    def weight_or_size(a: fx.Node) -> bool:
        return a.op in ("placeholder", "get_attr") or not isinstance(meta_val(a), torch.Tensor)

    changed = True
    while changed:
        changed = False
        for n in graph.nodes:
            if n in region or n.users or n.op not in ("call_function", "call_method"):
                continue
            inputs = n.all_input_nodes
            if any(a in region for a in inputs) and all(a in region or a not in upstream for a in inputs):
                region.add(n)
                changed = True
        for a in external_inputs(region):
            if (a.op in ("call_function", "call_method") and a not in upstream and all(u in region for u in a.users)
                    and all(b in region or weight_or_size(b) for b in a.all_input_nodes)):
                region.add(a)
                changed = True


def find_experts(router: Router, tensor_of) -> Experts:
    """The experts region the router's ids feed, or the reason none was found in this graph."""
    ids_exit, w_exit = router.ids_exit, router.weights_exit
    users = [u for u in ids_exit.users if u not in router.closure]
    if all(u.op == "output" for u in users):
        raise Declined("graph break: the experts run outside this graph")
    block = parent_block(scope(router.topk))
    consumer_scopes = {scope(u) for u in users if u.op != "output"}
    deeper = [p for p in consumer_scopes if p.startswith(block + ".")]
    if len(consumer_scopes) == 1 and deeper:
        path = deeper[0]
        inside = {n for n in ids_exit.graph.nodes if in_scope(n, path) and n.op in ("call_function", "call_method")}
        outs = [n for n in region_outputs(inside) if val(n) is not None]  # shared SymInt sizes don't count
        if len(outs) != 1:
            raise Declined(f"the experts module {clean_path(path)} has {len(outs)} outputs")
        output = outs[0]
        if w_exit not in ancestors([output]) and len(output.users) == 1:
            output = next(iter(output.users))  # gpt-fast: experts return [T, k, H]; the block combines with weights
    else:
        path = block
        inside = {n for n in descendants([ids_exit]) if n.op != "output" and (not block or in_scope(n, block))}
        inside -= router.closure
        outs = [n for n in region_outputs(inside) if val(n) is not None]
        if not outs:
            raise Declined("graph break: the experts run outside this graph")
        if len(outs) != 1:
            raise Declined(f"routing ids feed {len(outs)} separate computations in {clean_path(block)}")
        output = outs[0]
    return experts_region(ids_exit, w_exit, output, clean_path(path), tensor_of)


def experts_region(ids_exit: fx.Node, w_exit: fx.Node, output: fx.Node, path: str, tensor_of,
                   weights: tuple[fx.Node, ...] = ()) -> Experts:
    """The experts between the routing result (ids_exit, w_exit) and their one output, or Declined. `weights`:
    nodes that stand for weight tensors (a sharded weight's local tensor, passes.parallel) where the region stops."""
    upstream = ancestors([ids_exit, w_exit]) | {ids_exit, w_exit} | set(weights)
    region = {n for n in ancestors([output]) | {output}
              if n not in upstream and n.op in ("call_function", "call_method")}
    if w_exit not in ancestors([output]):
        raise Declined("the routing weights are not applied in the experts")
    _add_side_effects(region, upstream | descendants([output]))  # never what follows the output (an all-reduce)
    others = [n for n in region_outputs(region) if n is not output and val(n) is not None]
    if others:
        raise Declined(f"values inside the experts are used elsewhere ({others[0].name})")
    hidden, params = [], []
    tables = {u.args[3] for u in region if fn_name(u).startswith("moespec.offloaded_experts")}  # offload's slots
    for n in external_inputs(region):
        if n in (ids_exit, w_exit):
            continue
        v = meta_val(n)
        if n in weights or n.op in ("placeholder", "get_attr") and _is_weight(n, tensor_of) or n in tables:
            params.append(n)
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            hidden.append(n)
        elif isinstance(v, torch.Tensor):
            raise Declined(f"the experts read an unexpected tensor {n.name}")
    if len(hidden) != 1:
        names = ", ".join(n.name for n in hidden)
        raise Declined(f"the experts read {len(hidden)} activations ({names}), expected the hidden states only")
    h = shape(hidden[0])[-1]
    if shape(output) is None or shape(output)[-1] != h:
        raise Declined(f"the experts output {shape(output)} does not match the hidden size {h}")
    if len(shape(output)) != 2 and shape_source(hidden[0], shape(output)) is None:  # [T, H]: fused's own shape
        raise Declined(f"the experts output {shape(output)} has no same-shaped source among the hidden states' views")
    return Experts(region, output, hidden[0], params, path)
