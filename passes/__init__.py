"""FX graph passes of the moespec backend: discover -> experts rewrite -> budget rewrite.

    gm --discover--> routers (top-k + post-processing) and their experts regions, or reasons
       --experts---> fused_experts where a known layout reproduces the region's numbers
       --budget----> budget_topk / budget_apply around every router understood

`counters` counts what each pass did (tests read it); `run_passes` returns one BlockReport per
MoE block found or declined.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_spec_compile.budget import BudgetConfig

from . import budget as budget_pass
from . import experts as experts_pass
from .discover import analyze_router, find_experts, is_topk, routing_closure
from .graph_utils import clean_path, fake_mode_of, looks_like_moe, scope

__all__ = ["BlockReport", "counters", "run_passes"]

counters: collections.Counter = collections.Counter()


@dataclass
class BlockReport:
    name: str
    num_experts: int | None
    top_k: int | None
    router: str  # router kind and features, e.g. "sigmoid, bias-corrected selection, grouped top-k"
    rewritten: bool  # routing budgeted
    experts: str  # "fused_experts (silu)", "model code (graph break)", ...
    reason: str  # why something was left alone ("" when fully rewritten)


def _tensor_lookup(gm: fx.GraphModule, example_inputs):
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    by_node = {n: example_inputs[i] for i, n in enumerate(placeholders) if i < len(example_inputs)}

    def tensor_of(node: fx.Node):
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        t = by_node.get(node)
        return t if isinstance(t, torch.Tensor) else None

    return tensor_of


def _concrete(x):
    if isinstance(x, torch.SymInt | torch.SymFloat | torch.SymBool):
        return x.node.hint
    if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter):
        return x.clone()  # the check run must not mutate the caller's buffers (KV caches)
    return x


def _capture(gm: fx.GraphModule, example_inputs, wanted: set[fx.Node]) -> dict:
    """Run the graph eagerly on (copies of) the example inputs; keep the values of `wanted` nodes."""
    values = {}

    class _Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                values[n] = out.detach().clone() if isinstance(out, torch.Tensor) else out
            return out

    with torch.no_grad():
        _Capture(gm).run(*[_concrete(x) for x in example_inputs])
    return values


def run_passes(gm: fx.GraphModule, example_inputs, cfg: BudgetConfig, impl: str = "auto",
               fuse_experts: bool = True, block_names=None) -> list[BlockReport]:
    """Rewrite `gm` in place; return one report per MoE block (found or declined)."""
    counters["graphs"] += 1
    fake_mode = fake_mode_of(gm)
    tensor_of = _tensor_lookup(gm, example_inputs)
    reports: list[BlockReport] = []
    plans = []  # (router, experts or reason, name)
    for node in [n for n in gm.graph.nodes if is_topk(n)]:
        counters["topk_seen"] += 1
        name = clean_path(scope(node)) or node.name
        router = analyze_router(node)
        if isinstance(router, str):
            if looks_like_moe(node):
                reports.append(BlockReport(name, None, None, "?", False, "left alone", router))
                counters["routers_declined"] += 1
            continue
        name = router.block
        if block_names is not None:
            name = block_names(router, tensor_of) or name
        reason = routing_closure(router, stop=set())
        if reason is None:
            reason = budget_pass.check(router)
        if reason is not None:
            reports.append(BlockReport(name, router.num_experts, router.k, router.kind, False, "left alone", reason))
            counters["routers_declined"] += 1
            continue
        experts = find_experts(router, tensor_of) if fuse_experts else "experts rewrite disabled"
        if isinstance(experts, str) and experts.startswith("graph break") and not looks_like_moe(router.topk):
            reports.append(BlockReport(name, router.num_experts, router.k, router.kind, False, "left alone",
                                       "a top-k over a linear layer whose indices leave the graph, not a MoE router"))
            continue
        plans.append((router, experts, name))
    counters["routers_found"] += len(plans)
    # Auxiliary top-ks inside a router found (DeepSeek's group selection) are not blocks of their own.
    router_scopes = {clean_path(scope(r.topk)) for r, _, _ in plans} | {
        r.name for r in reports if r.num_experts is not None}
    reports = [r for r in reports if r.num_experts is not None or r.name not in router_scopes]

    wanted = set()
    for router, experts, _ in plans:
        if not isinstance(experts, str):
            wanted |= {experts.hidden, experts.output, router.ids_exit, router.weights_exit}
    values = _capture(gm, example_inputs, wanted) if wanted and fake_mode is not None else {}

    for router, experts, name in plans:
        kind = ", ".join([router.kind, *router.features])
        to_empty, experts_note, reason = False, "", ""
        if isinstance(experts, str):
            experts_note, reason = "model code", experts
        else:
            layout = experts_pass.identify(
                experts, {**values, "ids": values[router.ids_exit], "weights": values[router.weights_exit]},
                tensor_of, router.num_experts, router.k)
            if isinstance(layout, str):
                experts_note, reason = "model code", layout
                counters["experts_declined"] += 1
            else:
                safe = re.sub(r"\W", "_", name)
                ids2 = experts_pass.rewrite(gm, fake_mode, experts, layout, router.ids_exit, router.weights_exit,
                                            router.k, impl, safe)
                to_empty = all(u is ids2 for u in router.ids_exit.users)
                experts_note = f"fused_experts ({layout.describe()})"
                counters["experts_fused"] += 1
        budget_pass.rewrite(gm, fake_mode, router, cfg, name, to_empty)
        counters["routers_budgeted"] += 1
        reports.append(BlockReport(name, router.num_experts, router.k, kind, True, experts_note, reason))
    gm.graph.lint()  # no eliminate_dead_code: it drops in-place writes (DeepSeek's group_mask.scatter_)
    gm.recompile()
    return reports
