"""Lowering for inductor: a copy of the rewritten graph whose moespec ops run as plain tensor code.

    budget_topk(x, scores, ..., site)  ->  select_in_graph(x, scores, c, share, cap, tokens, stats, slots, ..., site)
    budget_apply(ids, w, keep, ...)    ->  apply_keep(ids, w, keep, to_empty)
    fused_experts(...)                 ->  experts_in_graph(...)        (where experts_op.in_graph_pays)

The ops are opaque to inductor: Python calls of many small aten ops that split the graph's fusions. Their in-graph
forms are the same math (moe_spec_compile.routing_ops, experts_op), traced by inductor with the rest of the pass.
The budget tables and the slot of each routing site become six graph inputs after the graph's own (the backend
appends them to every call; naming.Sites writes the slots). The backend runs the graph with the ops where the host
has a part (recorded events, offload's resident-only passes, other run-time policies than the graph was traced
under).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from moe_spec_compile.experts_op import experts_in_graph, in_graph_pays
from moe_spec_compile.routing_ops import apply_keep, select_in_graph

from .graph_utils import call, meta_val

TABLES = ("c", "share", "cap", "tokens", "stats")  # budget.tables' entries the graph reads, in input order


def in_graph(gm: fx.GraphModule, tables: dict[str, torch.Tensor], slots: torch.Tensor) -> fx.GraphModule | None:
    """The lowered copy of `gm` taking tables' TABLES and then `slots` [sites] after gm's own inputs, or None where
    nothing is budgeted or a routed tensor's shape is symbolic (the selection's host-side choices need sizes). gm
    itself is left as it is (dynamo reads its placeholders after the backend returns)."""
    topks = [n for n in gm.graph.nodes if n.target is torch.ops.moespec.budget_topk.default]
    if not topks or not all(all(isinstance(d, int) for d in meta_val(n.args[0]).shape) for n in topks):
        return None
    g = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    out, _ = g.graph_copy(gm.graph, remap, return_output_node=True)
    old_inputs = list(gm.graph.find_nodes(op="placeholder"))
    for old in old_inputs:  # AOTAutograd matches dynamo's graph inputs by these
        remap[old]._dynamo_source = getattr(old, "_dynamo_source", None)
    fake_mode = meta_val(topks[0].args[0]).fake_mode
    last = remap[old_inputs[-1]]
    extra = []
    for name, t in [*((k, tables[k]) for k in TABLES), ("slots", slots)]:
        with g.inserting_after(last):
            last = g.placeholder(f"moespec_{name}")
        last._dynamo_source = None
        last.meta["val"] = fake_mode.from_tensor(t)
        extra.append(last)
    g.output(out)
    for old in gm.graph.nodes:
        new = remap.get(old)
        if old.target is torch.ops.moespec.budget_topk.default:
            x, scores, k, score_fn, _spec, policy, max_tokens, sorted_, token_mask, site, score = new.args
            target, args = select_in_graph, (x, scores, *extra, k, score_fn, policy, max_tokens, sorted_, token_mask,
                                             site, score)
        elif old.target is torch.ops.moespec.budget_apply.default:
            target, args = apply_keep, tuple(new.args[:4])
        elif old.target is torch.ops.moespec.fused_experts.default and _experts_pay(new):
            target, args = experts_in_graph, new.args
        else:
            continue
        with g.inserting_before(new):
            repl = call(g, fake_mode, target, args, new.kwargs)
        new.replace_all_uses_with(repl)
        g.erase_node(new)
    lowered = fx.GraphModule(gm, g)
    lowered.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        lowered._param_name_to_source = gm._param_name_to_source
    return lowered


def _experts_pay(node: fx.Node) -> bool:
    names = ("hidden", "topk_ids", "topk_weights", "w_gate_up", "w_down", "activation", "b_gate_up", "b_down",
             "interleaved", "alpha", "limit", "impl", "w_up")
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    vals = {k: meta_val(v) if isinstance(v, fx.Node) else v for k, v in bound.items()}
    if any(vals.get(k) is None for k in ("hidden", "topk_ids", "w_gate_up", "w_down")):
        return False
    return in_graph_pays(vals["hidden"], vals["topk_ids"], vals["w_gate_up"], vals["w_down"], vals.get("w_up"),
                         vals.get("impl", "auto"))
