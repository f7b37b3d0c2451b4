"""Expert parallelism as transformers runs it (``DistributedConfig(ep_size=W)`` under torchrun): each rank holds
E / W consecutive experts as the local shard of a DTensor, the router runs replicated, the routes to other ranks'
experts are masked (weight 0, a sentinel id) and the ranks' partial outputs are summed by an all-reduce.

    ids, w (global, the router's exits) --remap (elementwise: owner test, local id, sentinel)--> local ids, w
      --experts on the local shard (weights through .to_local())--> partial [T, H] --all_reduce(sum)--> output

transformers moved the remap between releases (5.17: a post-forward hook on the router, ``ep_router``; 5.25:
inside the experts' own forward, ``ep_dispatch_experts`` with AllReduceEP); both trace to the same shape. The remap
is recognised by what it computes, not by its ops: it is run alone on every global id (and -1, a dropped budget
slot) and must keep exactly this rank's experts at their local index with their weight, and send every other id
to weight 0 outside [0, E / W). Then the experts between the remap and the all-reduce are fused like any other
(fused_experts reads the local shard; ids outside it become -1: nothing loaded), the all-reduce stays the model's.

The budget set A comes from the full router output, which every rank computes from the same replicated router
and the same hidden states (transformers' own top-k relies on the same fact), so every rank applies the same A
without a collective; each rank then loads only the experts of A it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .discover import Experts, Router, experts_region
from .graph_utils import (
    Declined,
    ancestors,
    clean_path,
    descendants,
    fn_name,
    in_scope,
    meta_val,
    parent_block,
    scope,
    shape,
)

__all__ = ["ExpertShard", "find_shard", "local_weight", "shard_note"]

# Ops a remap of routing results may use (elementwise, shape-preserving); anything else ends the remap.
_REMAP_OPS = {"floordiv", "floor_divide", "div", "mod", "remainder", "fmod", "ne", "eq", "lt", "le", "gt", "ge",
              "where", "masked_fill", "sub", "add", "mul", "logical_not", "logical_or", "logical_and", "or_", "and_",
              "invert", "to", "type", "type_as", "long", "int", "float", "clone", "contiguous"}
_ALL_REDUCE = ("_c10d_functional.all_reduce", "c10d_functional.all_reduce")


@dataclass
class ExpertShard:
    first: int  # the first global expert id this rank holds
    count: int  # experts held here (E / W)
    total: int  # E
    ids: fx.Node  # local ids [..., k] (outside [0, count): another rank's expert)
    weights: fx.Node  # local routing weights [..., k] (0 for another rank's expert)
    params: tuple[fx.Node, ...]  # the .to_local() nodes of the sharded expert weights
    reduce: fx.Node  # the all-reduce summing the ranks' partial outputs
    remap_scope: str  # the module whose code remaps the routes (the router's hook, or the experts' forward)

    @property
    def ranks(self) -> int:
        return self.total // self.count

    def describe(self) -> str:
        last = self.first + self.count - 1
        return (f"expert parallel: experts {self.first}-{last} of {self.total} on this rank ({self.count} per rank, "
                f"{self.ranks} ranks), routes remapped in {self.remap_scope or '<top>'}, partial outputs "
                "all-reduced")


def local_weight(node: fx.Node):
    """The DTensor behind a ``.to_local()`` node of a graph input, else None."""
    if node.op == "call_method" and node.target == "to_local" and isinstance(node.args[0], fx.Node):
        v = meta_val(node.args[0])
        if _is_dtensor(v):
            return node.args[0]
    return None


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or hasattr(t, "placements") and hasattr(t, "device_mesh")


def _is_all_reduce(node: fx.Node) -> bool:
    return node.op == "call_function" and any(s in str(node.target) for s in _ALL_REDUCE) and \
        "sum" in [a for a in node.args if isinstance(a, str)]


def find_shard(router: Router, tensor_of) -> ExpertShard | None:
    """The expert-parallel layout after `router`, or None where the routes reach the experts unremapped (no
    all-reduce of expert outputs after them). Raises Declined where a remap is there but is not one moespec can
    prove (the block's experts then stay the model's code)."""
    ids_exit, w_exit = router.ids_exit, router.weights_exit
    block = parent_block(scope(router.topk))  # this block's module path in the graph (later layers' follow)
    reduces = [n for n in descendants([ids_exit]) if _is_all_reduce(n) and isinstance(n.args[0], fx.Node)
               and in_scope(n, block) and w_exit in ancestors([n.args[0]])]
    if not reduces:
        return None
    order = {n: i for i, n in enumerate(ids_exit.graph.nodes)}
    reduce = min(reduces, key=order.__getitem__)
    partial = reduce.args[0]
    shards = [n for n in ancestors([partial]) if local_weight(n) is not None and n not in ancestors([ids_exit])]
    if not shards:
        return None  # an all-reduce over replicated experts (tensor parallel inside them): not expert parallel
    locals_ = {shape(n)[0] for n in shards}
    if len(locals_) != 1:
        raise Declined(f"the sharded expert weights hold different expert counts {sorted(locals_)} on this rank")
    count = locals_.pop()
    e, k = router.num_experts, router.k
    if count == e:
        raise Declined("the experts are split by tensor parallelism (every rank holds a slice of each expert, partial "
                       "outputs all-reduced); fused_experts takes whole experts, so the model's code runs them")
    if count > e or e % count:
        raise Declined(f"{count} experts on this rank do not divide the router's {e}")
    first = _shard_offset(shards, tensor_of, count)
    ids, weights, remap = _remap_exits(ids_exit, w_exit, partial, router.closure)
    _check_remap(remap, ids_exit, w_exit, ids, weights, e, k, first, count)
    where = {clean_path(scope(n)) for n in remap}
    return ExpertShard(first, count, e, ids, weights, tuple(sorted(shards, key=order.__getitem__)), reduce,
                       sorted(where)[0] if where else "")


def _shard_offset(shards, tensor_of, count: int) -> int:
    """The first global expert id of this rank's shard, from the DTensor's mesh and placement (Shard(0))."""
    offsets = set()
    for n in shards:
        dt = tensor_of(n.args[0])
        if dt is None or not _is_dtensor(dt):
            raise Declined(f"the sharded expert weight {n.args[0].name} is not a DTensor here")
        mesh, placements = dt.device_mesh, dt.placements
        if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0):
            raise Declined(f"expert weights placed {placements} on a {mesh.ndim}-D mesh; moespec knows Shard(0) "
                           "over one mesh dimension")
        offsets.add(mesh.get_local_rank() * count)
    if len(offsets) != 1:
        raise Declined("the expert weights of one block are sharded over different meshes")
    return offsets.pop()


def _remap_exits(ids_exit: fx.Node, w_exit: fx.Node, partial: fx.Node, closure: set[fx.Node]):
    """(local ids, local weights, remap nodes): the elementwise ops on the routing result alone before the experts."""
    want = shape(ids_exit)
    remap: set[fx.Node] = set()
    frontier = list(ids_exit.users) + list(w_exit.users)
    while frontier:
        n = frontier.pop()
        if n in remap or n.op not in ("call_function", "call_method") or fn_name(n) not in _REMAP_OPS:
            continue
        if shape(n) != want or not all(a in remap or a in (ids_exit, w_exit) for a in n.all_input_nodes):
            continue
        remap.add(n)
        frontier.extend(n.users)
    needed = ancestors([partial])
    exits = [n for n in remap if n in needed and any(u not in remap for u in n.users)]
    ids = [n for n in exits if not meta_val(n).is_floating_point() and meta_val(n).dtype != torch.bool]
    weights = [n for n in exits if meta_val(n).is_floating_point()]
    if len(ids) != 1 or len(weights) != 1:
        raise Declined(f"the routes reach the sharded experts in {len(ids)} id and {len(weights)} weight tensors "
                       "after a remap moespec does not know")
    outside = [u for x in (ids_exit, w_exit) for u in x.users if u not in remap and u not in closure]
    if outside:
        raise Declined(f"the routing result is also used outside the expert-parallel remap ({outside[0].name})")
    return ids[0], weights[0], remap


def _check_remap(remap, ids_exit, w_exit, ids, weights, e: int, k: int, first: int, count: int) -> None:
    """Run the remap alone on every global id (and -1, a slot a budget dropped): this rank's experts keep their
    weight at local id (id - first); every other id gets weight 0 and a local id outside [0, count)."""
    graph = fx.Graph()
    env = {ids_exit: graph.placeholder("ids"), w_exit: graph.placeholder("w")}
    order = {n: i for i, n in enumerate(ids_exit.graph.nodes)}
    for n in sorted(remap, key=order.__getitem__):
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output((env[ids], env[weights]))
    module = fx.GraphModule(torch.nn.Module(), graph)
    flat = torch.cat([torch.arange(-1, e), torch.arange(e)])
    flat = torch.cat([flat, flat[: (-len(flat)) % k]]) if len(flat) % k else flat
    g_ids = flat.reshape(-1, k).to(meta_val(ids_exit).dtype)
    g_w = torch.rand(g_ids.shape, generator=torch.Generator().manual_seed(0)).to(meta_val(w_exit).dtype) + 0.5
    lead = shape(ids_exit)[:-1]
    if len(lead) > 1:  # [B, S, k] routes: the same values as one row of rows
        g_ids, g_w = g_ids.reshape(1, -1, k).expand(*[1] * (len(lead) - 1), -1, k), g_w.reshape(1, -1, k)
    try:
        with torch.no_grad():
            l_ids, l_w = module(g_ids.to(meta_val(ids_exit).device), g_w.to(meta_val(w_exit).device))
    except Exception as err:  # noqa: BLE001 - any failure means the remap is not understood
        raise Declined(f"the expert-parallel remap does not run alone ({err})") from err
    g_ids, g_w, l_ids, l_w = (t.reshape(-1).cpu() for t in (g_ids, g_w, l_ids, l_w))
    mine = (g_ids >= first) & (g_ids < first + count)
    ok = (torch.equal(l_ids[mine], g_ids[mine] - first) and torch.equal(l_w[mine], g_w[mine])
          and bool((l_w[~mine] == 0).all()) and bool(((l_ids[~mine] < 0) | (l_ids[~mine] >= count)).all()))
    if not ok:
        raise Declined(f"the routes are remapped after the router, but not to experts {first}-{first + count - 1} "
                       "at their local index with every other expert masked: not expert parallelism moespec knows")


def shard_experts(shard: ExpertShard, tensor_of) -> Experts:
    """The experts region between the remap and the all-reduce, reading the local shard's weights."""
    return experts_region(shard.ids, shard.weights, shard.reduce.args[0], clean_path(scope(shard.reduce.args[0])),
                          tensor_of, weights=shard.params)


def shard_note(tensor_of, gm: fx.GraphModule) -> str:
    """For blocks whose experts are not sharded in a graph that holds DTensors (tensor parallel elsewhere): what
    each rank runs."""
    for n in gm.graph.nodes:
        if n.op == "placeholder" and _is_dtensor(tensor_of(n)):
            return "experts replicated: every rank runs all of them (tensor parallel elsewhere)"
    return ""
