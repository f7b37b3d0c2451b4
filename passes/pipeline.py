"""The pass pipeline of the moespec backend, in the order a compiler engineer reads it:

    gm --find_routers--> each top-k: a Router (kind, exits) or Declined(reason)
       --find_experts--> the experts region each router's ids feed, or Declined
       --experts-------> fused_experts over the model's own weights, when one layout is confirmed
       --budget--------> budget_topk / budget_apply around every router understood
       --unclaimed-----> blocks holding experts that no router reached: declined, with their expert count

`run_passes` returns one BlockReport per MoE block found or declined; counts go to
torch._dynamo.utils.counters["moespec"].
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_spec_compile.budget import BudgetConfig
from moe_spec_compile.naming import param_name

from . import budget as budget_pass
from . import experts as experts_pass
from . import parallel
from .discover import Router, analyze_router, find_experts, is_topk, routing_closure
from .graph_utils import Declined, call, clean_path, count, fake_mode_of, looks_like_moe, parent_block, scope

__all__ = ["BlockReport", "run_passes"]

# Routers inside attention (JetMoE's mixture of attention heads) are budgeted like MLP routers: at most C of
# their experts (per-expert projection weights) load per pass. Dynamo shares one graph between the instances
# of a router class, so attention and MLP routers of one class cannot be treated differently anyway.
_ATTENTION = re.compile(r"(^|\.)(self_)?(attn|attention)($|\.)|MoA|Attention", re.IGNORECASE)


@dataclass
class BlockReport:
    name: str
    num_experts: int | None
    top_k: int | None
    router: str  # router kind and features, e.g. "sigmoid, bias-corrected selection, grouped top-k"
    rewritten: bool  # routing budgeted
    experts: str  # "fused_experts (silu)", "model code (graph break)", ...
    reason: str  # why something was left alone ("" when fully rewritten)
    parallel: str = ""  # under torchrun: which experts this rank holds and runs (passes.parallel), else ""


def tensor_lookup(gm: fx.GraphModule, example_inputs):
    """node -> the real tensor behind a placeholder or get_attr (None for anything else)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    by_node = {n: example_inputs[i] for i, n in enumerate(placeholders) if i < len(example_inputs)}

    def tensor_of(node: fx.Node):
        sharded = parallel.local_weight(node)
        if sharded is not None:  # a sharded weight's .to_local(): this rank's shard
            t = tensor_of(sharded)
            return t.to_local() if t is not None else None
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        t = by_node.get(node)
        return t if isinstance(t, torch.Tensor) else None

    return tensor_of


def _source(node: fx.Node) -> str:
    ga = node.meta.get("grapharg")
    return ga.source.name if ga is not None and hasattr(ga, "source") else ""


def attention_mask_node(gm: fx.GraphModule, tensor_of) -> fx.Node | None:
    """The model's 2-D attention mask among the graph's inputs (padding must not vote in the budget set)."""
    for n in gm.graph.nodes:
        if n.op != "placeholder" or "attention_mask" not in _source(n):
            continue
        t = tensor_of(n)
        if t is not None and t.dim() == 2 and not t.is_floating_point():
            return n
    return None


def _find_router(node: fx.Node, block_names, tensor_of) -> Router:
    router = analyze_router(node)
    if block_names is not None:
        router.block = block_names(router, tensor_of) or router.block
    routing_closure(router, stop=set())
    budget_pass.check(router)
    return router


def run_passes(gm: fx.GraphModule, example_inputs, cfg: BudgetConfig, impl: str = "auto",
               fuse_experts: bool = True, block_names=None) -> list[BlockReport]:
    """Rewrite `gm` in place; return one report per MoE block (found or declined). gm.meta["moespec_sites"]: the
    budgeted routers in site order, (graph input index of the router weight or None, compile-time block name)."""
    count("graphs")
    fake_mode = fake_mode_of(gm)
    tensor_of = tensor_lookup(gm, example_inputs)
    reports: list[BlockReport] = []
    plans = []  # (router, experts or Declined, expert-parallel shard or None, what the sharding is when not one)
    for node in [n for n in gm.graph.nodes if is_topk(n)]:
        count("topk_seen")
        try:
            router = _find_router(node, block_names, tensor_of)
        except Declined as why:
            name = _declined_name(node, block_names, tensor_of)
            if looks_like_moe(node, name):
                reports.append(BlockReport(name, _experts_count(node), None, "?", False, "left alone", why.reason))
                count("routers_declined")
            continue
        shard, sharding = None, ""
        try:
            try:
                shard = parallel.find_shard(router, tensor_of)
            except Declined:
                sharding = "experts sharded in a way fused_experts does not take (see reason): the model's code"
                raise
            if not fuse_experts:
                raise Declined("experts rewrite disabled")
            experts = parallel.shard_experts(shard, tensor_of) if shard else find_experts(router, tensor_of)
        except Declined as why:
            experts = why
            if why.reason.startswith("graph break") and not looks_like_moe(router.topk, router.block):
                reports.append(BlockReport(router.block, router.num_experts, router.k, router.kind, False,
                                           "left alone", "a top-k over a linear layer whose indices leave the "
                                           "graph, not a MoE router"))
                continue
        plans.append((router, experts, shard, sharding))
    count("routers_found", len(plans))
    # Auxiliary top-ks inside a router found (DeepSeek's group selection) are not blocks of their own.
    found = {plan[0].block for plan in plans}
    reports = [r for r in reports if r.name not in found]

    # Routing sites, in graph order: (index of the graph input holding the router weight or None, block name,
    # (first, count) of the experts this rank holds or None when it holds them all).
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    sites: list[tuple[int | None, str, tuple[int, int] | None]] = []
    gm.meta["moespec_sites"] = sites
    replicated = parallel.shard_note(tensor_of, gm)
    for router, experts, shard, sharding in plans:
        kind = ", ".join([router.kind, *router.features])
        to_empty, experts_note, reason = False, "", ""
        offloaded = _offloaded(experts, tensor_of)
        try:
            if isinstance(experts, Declined):
                raise experts
            if offloaded:  # the experts already run in a moespec op (moe_spec_compile.offload): nothing to fuse
                raise Declined("")
            ids, weights = (shard.ids, shard.weights) if shard else (router.ids_exit, router.weights_exit)
            layout = experts_pass.identify(experts, ids, weights, tensor_of, shard.count if shard else
                                           router.num_experts, router.k)
        except Declined as why:
            experts_note, reason = offloaded or "model code", why.reason
            if not isinstance(experts, Declined) and not offloaded:
                count("experts_declined")
            # the offloaded op reads -1 as an empty slot where it alone reads the ids
            to_empty = bool(offloaded) and all(u in experts.region for u in router.ids_exit.users)
        else:
            if shard:  # other ranks' experts (local ids outside the shard) become empty slots: nothing loaded
                ids = _empty_outside(gm, fake_mode, experts, ids, shard.count)
            ids2 = experts_pass.rewrite(gm, fake_mode, experts, layout, ids, weights, router.k, impl)
            # dropped slots may be -1 where only fused_experts reads the ids, or the remap checked that -1 is masked
            to_empty = shard is not None or all(u is ids2 for u in router.ids_exit.users)
            experts_note = f"fused_experts ({layout.describe()})"
            count("experts_fused")
        budget_pass.rewrite(gm, fake_mode, router, cfg, len(sites), to_empty, attention_mask_node(gm, tensor_of))
        sites.append((placeholders.get(router.weight), router.block, (shard.first, shard.count) if shard else None))
        count("routers_budgeted")
        reports.append(BlockReport(router.block, router.num_experts, router.k, kind, True, experts_note, reason,
                                   shard.describe() if shard else sharding or replicated))
    reports += _unclaimed_blocks(gm, tensor_of, {r.name for r in reports})
    gm.graph.lint()  # no eliminate_dead_code: it drops in-place writes (DeepSeek's group_mask.scatter_)
    gm.recompile()
    return reports


def _offloaded(experts, tensor_of) -> str:
    """"offloaded_experts (R of E resident)" when the region is moespec::offloaded_experts, else ""."""
    if isinstance(experts, Declined):
        return ""
    from moe_spec_compile.offload import block_of

    for n in experts.region:
        if n.target in (torch.ops.moespec.offloaded_experts, torch.ops.moespec.offloaded_experts.default):
            table = tensor_of(n.args[3])
            block = block_of(table) if table is not None else None
            return f"offloaded_experts ({block.resident} of {block.num_experts} resident)" if block else \
                "offloaded_experts"
    return ""


def _empty_outside(gm: fx.GraphModule, fake_mode, experts, ids: fx.Node, count_: int) -> fx.Node:
    """ids with every local id outside [0, count_) (another rank's expert, the remap's sentinel) made -1."""
    g = gm.graph
    with g.inserting_before(experts.output):
        outside = call(g, fake_mode, torch.logical_or, (call(g, fake_mode, torch.lt, (ids, 0)),
                                                         call(g, fake_mode, torch.ge, (ids, count_))))
        return call(g, fake_mode, torch.where, (outside, -1, ids))


def _declined_name(node: fx.Node, block_names, tensor_of) -> str:
    """The block name of a declined top-k: its router's global name when the router linear is known."""
    try:
        router = analyze_router(node)
        if block_names is not None:
            return block_names(router, tensor_of) or router.block
        return router.block
    except Declined:
        return parent_block(clean_path(scope(node))) or node.name


def _experts_count(node: fx.Node) -> int | None:
    v = node.args[0].meta.get("example_value") if node.args and isinstance(node.args[0], fx.Node) else None
    return v.shape[-1] if isinstance(v, torch.Tensor) and v.dim() else None


# --- blocks holding experts that no router reached -----------------------------------------------------

def _param_path(node: fx.Node) -> str:
    """"L['self']._modules['moes']._modules['0']._parameters['w1']" -> "moes.0.w1"."""
    src = _source(node) or str(node.target)
    names = [a or b for a, b in re.findall(r"\['([^']+)'\]|\.(\w+)", src)]
    names = [n for n in names if n not in ("self", "_modules", "_parameters", "_buffers", "mod")]
    return ".".join(n for n in names if n != "_orig_mod")


def _unclaimed_blocks(gm: fx.GraphModule, tensor_of, claimed: set[str]) -> list[BlockReport]:
    """Every module holding stacked (3-D) expert weights or a numbered list of experts appears in the report:
    those no router reached are declined here, with their expert count."""
    blocks: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "get_attr"):
            continue
        t = tensor_of(n)
        if not isinstance(t, torch.nn.Parameter):
            continue
        path = (param_name(t) or _param_path(n)).split(".")
        if not re.search("expert|moe", ".".join(path), re.I):
            continue
        if t.dim() == 3 and t.shape[0] >= 2:
            block = ".".join(path[:-1])
            blocks[parent_block(block) if block.endswith("experts") else block] = t.shape[0]
            continue
        for j in range(len(path) - 1, 0, -1):  # ...experts.<index>...: a list of experts
            if path[j].isdigit() and re.search("expert", path[j - 1], re.I):
                block = ".".join(path[:j])
                blocks[block] = max(blocks.get(block, 0), int(path[j]) + 1)
                break
    out = []
    for block, e in sorted(blocks.items()):
        top = (block[: -len("experts")].rstrip(".") if block.endswith("experts") else block) or "<top>"
        if any(c == top or c == block or c.startswith(top + ".") or top.startswith(c + ".") for c in claimed if c):
            continue
        if _ATTENTION.search(block):
            continue
        count("blocks_without_router")
        out.append(BlockReport(top, e, None, "?", False, "left alone",
                               "no router top-k found for these experts (selection by max/argmax, masking or "
                               "sorting is not recognised)"))
    return out
