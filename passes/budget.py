"""Budget rewrite: the router's selection top-k becomes moespec::budget_topk, and the routing result
passes through moespec::budget_apply where it leaves the router.

    v, ids = topk(x, k)  ->  v, ids, keep = budget_topk(x, scores, k, ..., attention_mask)  (substitute: within A)
    (ids, w) at the exit ->  ids, w = budget_apply(ids, w, keep, ...)          (truncate: drop outside A)

The compile-time budget spec is registered (an int id in the op's arguments); the budget itself is read on
the device from the block's slot (moe_spec_compile/budget.py), which `msc.budget(...)` rewrites in place. The
ops carry the router's site number, not its name or weight: the backend binds each site's slot before a call.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from moe_spec_compile.budget import BudgetConfig, register_spec

from .discover import Router
from .graph_utils import Declined, call


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def check(router: Router) -> None:
    """Every user of the routing exits must come after both exits (budget_apply sits after the later)."""
    pos = _order(router.topk.graph)
    last = max(pos[router.ids_exit], pos[router.weights_exit])
    for ex in (router.ids_exit, router.weights_exit):
        for u in ex.users:
            if u not in router.closure and pos[u] < last:
                raise Declined(f"{u.name} reads the routing ids before the weights are final")


def rewrite(gm: fx.GraphModule, fake_mode, router: Router, cfg: BudgetConfig, site: int, to_empty: bool,
            token_mask: fx.Node | None = None) -> None:
    """`site`: the router's number among the graph's budgeted routers; its budget slot is bound per call
    (moe_spec_compile.naming.Sites), so one graph serving several layers reads each layer's own budget."""
    g = gm.graph
    spec = register_spec(cfg.budget)
    max_tokens = cfg.max_budget_tokens if cfg.max_budget_tokens is not None else -1
    topk = router.topk
    with g.inserting_after(topk):
        new = call(g, fake_mode, torch.ops.moespec.budget_topk.default,
                   (router.x, router.scores, router.k, router.score_fn, spec, cfg.policy, max_tokens, router.sorted,
                    token_mask, site, cfg.score))
    with g.inserting_after(new):
        outs = [call(g, fake_mode, operator.getitem, (new, i)) for i in range(3)]
    remapped = {}
    for user in list(topk.users):
        i = user.args[1]
        user.replace_all_uses_with(outs[i])
        remapped[user] = outs[i]
        g.erase_node(user)
    g.erase_node(topk)
    ids_exit = remapped.get(router.ids_exit, router.ids_exit)
    w_exit = remapped.get(router.weights_exit, router.weights_exit)
    closure = (router.closure - set(remapped) - {topk}) | set(outs)
    pos = _order(g)
    later = max((ids_exit, w_exit), key=pos.__getitem__)
    with g.inserting_after(later):
        applied = call(g, fake_mode, torch.ops.moespec.budget_apply.default,
                       (ids_exit, w_exit, outs[2], to_empty, site))
    with g.inserting_after(applied):
        new_ids = call(g, fake_mode, operator.getitem, (applied, 0))
        new_w = call(g, fake_mode, operator.getitem, (applied, 1))
    keep = closure | {applied}
    ids_exit.replace_all_uses_with(new_ids, delete_user_cb=lambda u: u not in keep)
    w_exit.replace_all_uses_with(new_w, delete_user_cb=lambda u: u not in keep)
