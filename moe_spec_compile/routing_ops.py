"""The routing ops: moespec::budget_topk replaces a router's selection top-k, moespec::budget_apply sits
where the routing result leaves the router.

router scores -> budget_topk (A = top-C experts of the pass; substitute: top-k within A) -> the model's own
weight post-processing -> budget_apply (truncate: drop slots outside A) -> experts

Legend: T tokens, E experts, k top-k, C budget, B rows, L mask length.

Scores: "prob", s_e = sum over the pass's tokens of w_t times the router's probability for e (softmax
routers: the full softmax; sigmoid routers: the sigmoid); "topk" (the default, budget.DEFAULT_SCORE), the same
sum over each token's own top-k only, renormalized per token (the weights the model applies); "top1", "prob"
with every token's first choice ranked first. w_t: 0 for padding where the graph
holds the model's 2-D attention mask [B, L] (the pass's S = T / B tokens are its last S columns), times
msc.token_weights (a draft tree's node weights); 1 otherwise. A = the C best by s (ties: lower index), with
C read from the block's slot in budget.tables on the device; the slot is the one the backend bound to the op's
routing site for this call (naming.Sites): the ops carry no block name and no router weight. Both ops have exact
gradients with respect to the router values and weights. Counters per slot (budget.expert_stats) are device
tensors that survive CUDA-graph replay; an exact pass outside any capture counts its passes and tokens on the host.
"""

from __future__ import annotations

import torch

from . import record
from .budget import count_on_host, effective_budget, expert_ranks, slot_mode, slot_name, tables
from .naming import current_slot, site_names
from .offload import note_wanted, resident_bonus, resident_mask, restricting

__all__ = ["budget_topk", "budget_apply", "token_weights"]


def _probs(scores: torch.Tensor, score_fn: str) -> torch.Tensor:
    if score_fn == "softmax":
        return torch.softmax(scores.float(), dim=-1)
    if score_fn == "sigmoid":
        return torch.sigmoid(scores.float())
    if score_fn == "identity":
        return scores.float()
    raise ValueError(f"unknown score_fn {score_fn!r}")


def token_weights(token_mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """[T] fp32 weights of the pass's tokens from a 2-D attention mask [B, L] (its last T / B columns), or
    None (every token votes) when there is no mask or it does not line up with the pass."""
    if token_mask is None or token_mask.dim() != 2:
        return None
    rows, length = token_mask.shape
    if rows == 0 or num_tokens % rows or num_tokens // rows > length:
        return None
    return token_mask[:, length - num_tokens // rows:].reshape(-1).float()


def _weights(token_mask, num_tokens, tokens: torch.Tensor) -> torch.Tensor | None:
    """Per-token weights [T]: the attention mask (padding 0) times msc.token_weights (draft-tree node weights, the
    tables' "tokens" row)."""
    w = token_weights(token_mask, num_tokens)
    if num_tokens <= tokens.shape[0]:
        given = tokens[:num_tokens]
        w = given if w is None else w * given
    return w


def _expert_scores(p: torch.Tensor, natural: torch.Tensor, w, score: str) -> torch.Tensor:
    """s [E] fp32 from probabilities p [T, E], each token's own top-k natural [T, k] (sorted: its top-1 first) and
    per-token weights w [T] (or None).
    prob: sum_t w_t p_t,e.  topk: the same over each token's own top-k, renormalized (the weights the model
    applies).  top1: prob, plus the total mass for experts that are some token's top-1 (they rank first)."""
    wt = w[:, None] if w is not None else 1.0
    if score == "prob":
        return (p * wt).sum(0)
    if score == "topk":
        sel = p.gather(-1, natural)  # [T, k]
        sel = sel / sel.sum(-1, keepdim=True).clamp(min=1e-20)
        return torch.zeros_like(p).scatter(-1, natural, sel).mul(wt).sum(0)
    if score == "top1":
        s = (p * wt).sum(0)
        first = torch.zeros_like(s).scatter(0, natural[:, 0], 1.0)  # [E] 1 for a token's top-1
        return s + first * (s.sum() + 1.0)
    raise ValueError(f"unknown score {score!r}")


def _budget_size(s: torch.Tensor, c: torch.Tensor, share: torch.Tensor, cap: torch.Tensor, k: int,
                 coverage: bool = True) -> torch.Tensor:
    """C for this pass as a 0-d device tensor from the slot's c, share, cap (0-d device tensors): the slot's C, or
    under Coverage the fewest experts holding `share` of the mass (capped); clamped to [k, E]. C = 0 (exact) means
    all E. coverage=False: the host knows the slot holds no Coverage spec (never while capturing), so the mass is
    not sorted."""
    e = s.shape[0]
    if not coverage:
        return torch.where(c > 0, c, e).clamp(min=k, max=e)
    sorted_s = torch.sort(s, descending=True).values
    mass = torch.cumsum(sorted_s, 0)
    cover = (mass < share * mass[-1] * (1 - 1e-6)).sum() + 1  # experts needed to reach the share
    cover = torch.minimum(cover, torch.where(cap > 0, cap, e))
    size = torch.where(share > 0, cover, torch.where(c > 0, c, e))
    return size.clamp(min=k, max=e)


def _count_exact(tabs, slot, num_tokens, ids, e: int) -> None:
    """An exact pass outside any capture: passes and tokens on the host, the experts it loads on the device."""
    count_on_host(slot, num_tokens)
    hit = torch.zeros(e, device=ids.device).index_fill_(0, ids.reshape(-1), 1.0)  # ids of a top-k: all >= 0
    tabs["stats"][slot, 2] += hit.sum()


def _count_row(num_tokens: int, ids, keep, natural_ids, size) -> torch.Tensor:
    """A pass's row of the slot's device counters (budget.COUNTERS: passes, tokens, experts loaded, budget bound,
    budget size); no host read. ids and natural_ids come from a top-k or a sort over E: all in [0, E)."""
    e = keep.shape[0]
    used = torch.zeros(e, device=ids.device).index_fill_(0, ids.reshape(-1), 1.0)
    natural = torch.zeros(e, device=ids.device).index_fill_(0, natural_ids.reshape(-1), 1.0).sum()
    return torch.stack([torch.ones((), device=ids.device), torch.full((), float(num_tokens), device=ids.device),
                        (used * keep).sum(), (natural > size).float(), torch.where(size < e, size, 0).float()])


def _count(tabs, slot, num_tokens, ids, keep, natural_ids, size) -> None:
    tabs["stats"][slot] += _count_row(num_tokens, ids, keep, natural_ids, size)


def _substitute(x: torch.Tensor, keep: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k within A (keep [E] bool): A's experts rank above all others, even where the model itself
    masked them to -inf (grouped top-k): such experts rank by index after A's finite ones. Ties: lower index."""
    key = torch.where(keep, x.clamp(min=torch.finfo(x.dtype).min), float("-inf"))
    indices = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k].contiguous()
    return x.gather(-1, indices), indices


def _scores_and_size(x, scores, k, score_fn, sorted, w, c, share, cap, score, coverage=True):
    """(natural values, natural indices [..., k], expert scores s [E], C as a 0-d tensor) of a budgeted pass."""
    e = x.shape[-1]
    natural_v, natural_i = torch.topk(x, k, dim=-1, sorted=sorted)
    p = _probs(scores, score_fn).reshape(-1, e)  # [T, E]
    ranked = natural_i if sorted or score != "top1" else torch.topk(x, k, dim=-1).indices  # top1 needs order
    s = _expert_scores(p, ranked.reshape(-1, k), w, score)  # [E]
    return natural_v, natural_i, s, _budget_size(s, c, share, cap, k, coverage)


@torch.library.custom_op("moespec::budget_topk", mutates_args=())
def budget_topk(
    x: torch.Tensor,  # [..., E] the tensor the model's top-k selects on
    scores: torch.Tensor,  # [..., E] router probabilities ("identity"), logits ("softmax", "sigmoid")
    k: int,
    score_fn: str,
    spec: int,  # the compile-time budget spec's id (budget.register_spec); -1: no budget compiled in
    policy: str,
    max_tokens: int,  # -1: no limit
    sorted: bool = True,
    token_mask: torch.Tensor | None = None,  # [B, L] the model's attention mask: padding does not vote
    site: int = -1,  # the routing site's number in its graph: its slot is bound per call (naming.Sites)
    score: str = "prob",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [..., k], indices [..., k], keep [E] int64: 1 for the experts of A, all ones when exact).

    The budget comes from the slot's device tables (no host read, no shape depending on C); only the
    policy, max_budget_tokens and the score choose code paths on the host."""
    e = x.shape[-1]
    num_tokens = x.numel() // e
    budgeted, policy, score = effective_budget(policy, max_tokens if max_tokens > 0 else None, score, num_tokens)
    slot = current_slot(site, max(spec, 0))[0]
    tabs = tables(x.device)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    mode = None if capturing else slot_mode(slot)  # host knowledge of the spec: fast paths outside captures only
    if not budgeted or mode == "exact":
        values, indices = torch.topk(x, k, dim=-1, sorted=sorted)
        keep = torch.ones(e, dtype=torch.int64, device=x.device)
        if capturing:  # a replay runs no Python: every counter on the device
            _count(tabs, slot, num_tokens, indices, keep, indices, e)
        else:
            _count_exact(tabs, slot, num_tokens, indices, e)
        return values, indices, keep
    natural_v, natural_i, s, size = _scores_and_size(
        x, scores, k, score_fn, sorted, _weights(token_mask, num_tokens, tabs["tokens"]), tabs["c"][slot],
        tabs["share"][slot], tabs["cap"][slot], score, coverage=mode != "fixed")
    # offload's resident-only passes (the self-drafter's) and prefer_resident(); every other pass skips this with one
    # host check
    block = slot_name(slot) if restricting() and not capturing else None
    allowed = resident_mask(block) if block is not None else None
    prefer = resident_bonus(block) if block is not None else None
    if prefer is not None:  # resident experts' scores count (1 + bonus) times: A takes fewer experts that must load
        s = torch.where(prefer[1], s * (1.0 + prefer[0]), s)
    if allowed is not None:
        note_wanted(block, natural_i)  # what the router wanted: the verify pass's experts, to prefetch
        s = torch.where(allowed, s, -1.0)  # scores are >= 0: A fills from the resident experts
    keep = expert_ranks(s) < size  # [E] bool
    if allowed is not None:
        keep = keep & allowed
    values, indices = _substitute(x, keep, k) if policy == "substitute" else (natural_v, natural_i)
    _count(tabs, slot, num_tokens, indices, keep, natural_i, size)
    return values, indices, keep.long()


@budget_topk.register_fake
def _(x, scores, k, score_fn, spec, policy, max_tokens, sorted=True, token_mask=None, site=-1, score="prob"):
    shape = (*x.shape[:-1], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64), x.new_empty((x.shape[-1],), dtype=torch.int64)


def _setup_topk(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.x_shape = inputs[0].shape


def _backward_topk(ctx, grad_values, _grad_indices, _grad_keep):
    (indices,) = ctx.saved_tensors
    grad_x = None
    if grad_values is not None:
        grad_x = torch.zeros(ctx.x_shape, dtype=grad_values.dtype, device=grad_values.device)
        grad_x = grad_x.scatter_add(-1, indices, grad_values)
    return grad_x, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("moespec::budget_topk", _backward_topk, setup_context=_setup_topk)


def _fill_ids(ids: torch.Tensor, dropped: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Dropped slots -> experts of A that the token does not use yet, lowest index first, so the model's own
    experts code sees k distinct ids per token (code that counts tokens per expert stays consistent)."""
    e = keep.shape[0]
    k = ids.shape[-1]
    flat, drop = ids.reshape(-1, k).long(), dropped.reshape(-1, k)  # [N, k]
    used = torch.zeros(flat.shape[0], e + 1, dtype=torch.bool, device=ids.device)
    used = used.scatter(1, torch.where(drop, e, flat), True)[:, :e]  # [N, E] kept ids
    free = keep.bool()[None, :] & ~used  # [N, E]
    key = torch.where(free, (e - torch.arange(e, device=ids.device)).float(), 0.0)
    fill = torch.topk(key, k, dim=-1).indices  # [N, k] free experts, lowest index first (C >= k of them)
    nth = (torch.cumsum(drop.long(), dim=-1) - 1).clamp(min=0)  # [N, k] which free expert a dropped slot takes
    return torch.where(drop, fill.gather(1, nth), flat).reshape(ids.shape).to(ids.dtype)


def apply_keep(ids, weights, keep, to_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """budget_apply's math (no recorded events): what the op runs and what a lowered graph traces (passes/lower.py)."""
    dropped = keep[ids.long()] == 0  # [..., k]; never true under substitute (every slot lies in A)
    new_weights = weights.masked_fill(dropped, 0)
    return (ids.masked_fill(dropped, -1) if to_empty else _fill_ids(ids, dropped, keep)), new_weights


@torch.library.custom_op("moespec::budget_apply", mutates_args=())
def budget_apply(
    ids: torch.Tensor,  # [..., k] the routing result as it leaves the router
    weights: torch.Tensor,  # [..., k]
    keep: torch.Tensor,  # [E] from budget_topk
    to_empty: bool,  # True: dropped slots get id -1 (fused_experts); False: distinct unused experts of A
    site: int = -1,  # names the block in recorded events (naming.site_names)
) -> tuple[torch.Tensor, torch.Tensor]:
    new_ids, new_weights = apply_keep(ids, weights, keep, to_empty)
    if record.active() and not (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        k = ids.shape[-1] if ids.dim() else 1
        size = int(keep.sum())
        block, compiled_as, held = site_names(site)
        record.emit(block, ids.numel() // max(k, 1), size if size < keep.shape[0] else None, new_ids[new_ids >= 0],
                    compiled_as, held)
    return new_ids, new_weights


@budget_apply.register_fake
def _(ids, weights, keep, to_empty, site=-1):
    return torch.empty_like(ids), torch.empty_like(weights)


def _setup_apply(ctx, inputs, output):
    ids, _w, keep = inputs[:3]
    ctx.save_for_backward(ids, keep)


def _backward_apply(ctx, _grad_ids, grad_weights):
    ids, keep = ctx.saved_tensors
    grad_w = grad_weights.masked_fill(keep[ids.long()] == 0, 0) if grad_weights is not None else None
    return None, grad_w, None, None, None


torch.library.register_autograd("moespec::budget_apply", _backward_apply, setup_context=_setup_apply)


# --- the same selection as plain tensor code inside an inductor graph --------------------------------------------
# budget_topk and budget_apply are opaque to inductor: every routing site costs two Python custom-op calls of ~30
# small aten ops each, and splits the graph's fusions around them (bundled target, 17-token pass, 2-core CPU: ~470 us
# a layer under a budget, where the rest of the pass costs ~380). In a graph inductor compiles they become calls of
# select_in_graph / apply_keep (passes/lower.py), which inductor traces and fuses: the budget tables and the
# graph's slot per site arrive as graph inputs (naming.Sites writes the slots), the counters are updated in place on
# the device, and nothing reads the host. What needs the host (recorded events, offload's resident-only passes,
# other policies than the graph was traced under) runs the graph with the ops instead (backend).

def select_in_graph(x, scores, c, share, cap, tokens, stats, slots, k: int, score_fn: str, policy: str,
                    max_tokens: int, sorted: bool, token_mask, site: int, score: str):
    """budget_topk's selection for slot slots[site] of the tables c, share, cap, tokens, stats (budget.tables)."""
    e = x.shape[-1]
    num_tokens = x.numel() // e
    slot = slots[site:site + 1]  # [1]: the slot naming.Sites bound to this site for this call
    budgeted, policy, score = effective_budget(policy, max_tokens if max_tokens > 0 else None, score, num_tokens)
    if not budgeted:
        values, indices = torch.topk(x, k, dim=-1, sorted=sorted)
        keep = torch.ones(e, dtype=torch.bool, device=x.device)
        stats.index_add_(0, slot, _count_row(num_tokens, indices, keep, indices, e)[None])
        return values, indices, keep.long()
    natural_v, natural_i, s, size = _scores_and_size(
        x, scores, k, score_fn, sorted, _weights(token_mask, num_tokens, tokens), c.index_select(0, slot)[0],
        share.index_select(0, slot)[0], cap.index_select(0, slot)[0], score)
    keep = expert_ranks(s) < size  # [E] bool
    values, indices = natural_v, natural_i
    if policy == "substitute":  # exact (C = E): the model's own top-k, ties and all
        sub_v, sub_i = _substitute(x, keep, k)
        exact = size >= e
        values, indices = torch.where(exact, natural_v, sub_v), torch.where(exact, natural_i, sub_i)
    stats.index_add_(0, slot, _count_row(num_tokens, indices, keep, natural_i, size)[None])
    return values, indices, keep.long()

