"""The routing ops: moespec::budget_topk replaces a router's selection top-k, moespec::budget_apply sits
where the routing result leaves the router.

router scores -> budget_topk (A = top-C experts of the pass; substitute: top-k within A) -> the model's own
weight post-processing -> budget_apply (truncate: drop slots outside A) -> experts

Legend: T tokens, E experts, k top-k, C budget, B rows, L mask length.

Scores: s_e = sum over the pass's tokens of the router's probability for e (softmax routers: the full
softmax; sigmoid routers: the sigmoid). Padding does not vote: where the graph holds the model's 2-D
attention mask [B, L], tokens it marks 0 get weight 0 in s_e (the pass's S = T / B tokens are the
mask's last S columns). Both ops have exact gradients with respect to the router values and weights.
"""

from __future__ import annotations

import torch

from . import record
from .budget import BudgetConfig, effective_budget, keep_top

__all__ = ["budget_topk", "budget_apply", "token_weights"]


def _config(budget: int, policy: str, max_tokens: int) -> BudgetConfig:
    return BudgetConfig(budget if budget > 0 else None, policy, max_tokens if max_tokens > 0 else None)


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


def _scores(scores, score_fn, token_mask, e) -> torch.Tensor:
    """s [E] fp32: the (unpadded) tokens' summed router probabilities."""
    p = _probs(scores, score_fn).reshape(-1, e)  # [T, E]
    w = token_weights(token_mask, p.shape[0])
    return (p * w[:, None]).sum(0) if w is not None else p.sum(0)


@torch.library.custom_op("moespec::budget_topk", mutates_args=())
def budget_topk(
    x: torch.Tensor,  # [..., E] the tensor the model's top-k selects on
    scores: torch.Tensor,  # [..., E] router probabilities ("identity"), logits ("softmax", "sigmoid")
    k: int,
    score_fn: str,
    budget: int,  # compile-time budget, -1: exact
    policy: str,
    max_tokens: int,  # -1: no limit
    sorted: bool = True,
    token_mask: torch.Tensor | None = None,  # [B, L] the model's attention mask: padding does not vote
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [..., k], indices [..., k], keep [E] int64: 1 for the experts of A, all ones when exact)."""
    e = x.shape[-1]
    c, policy = effective_budget(_config(budget, policy, max_tokens), x.numel() // e, e, k)
    if c is None:
        values, indices = torch.topk(x, k, dim=-1, sorted=sorted)
        return values, indices, torch.ones(e, dtype=torch.int64, device=x.device)
    keep = keep_top(_scores(scores, score_fn, token_mask, e), c)  # [E] bool
    if policy == "substitute":
        # Rank A's experts above all others, even where the model itself masked them to -inf (grouped
        # top-k): such experts rank by index after A's finite ones. Ties go to the lower index.
        key = torch.where(keep, x.clamp(min=torch.finfo(x.dtype).min), float("-inf"))
        indices = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k].contiguous()
        return x.gather(-1, indices), indices, keep.long()
    values, indices = torch.topk(x, k, dim=-1, sorted=sorted)
    return values, indices, keep.long()


@budget_topk.register_fake
def _(x, scores, k, score_fn, budget, policy, max_tokens, sorted=True, token_mask=None):
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
    return grad_x, None, None, None, None, None, None, None, None


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


@torch.library.custom_op("moespec::budget_apply", mutates_args=())
def budget_apply(
    ids: torch.Tensor,  # [..., k] the routing result as it leaves the router
    weights: torch.Tensor,  # [..., k]
    keep: torch.Tensor,  # [E] from budget_topk
    to_empty: bool,  # True: dropped slots get id -1 (fused_experts); False: distinct unused experts of A
    router_weight: torch.Tensor,  # names the block in recorded events (one graph may serve every layer)
    block: str,
    budget: int,
    policy: str,
    max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    dropped = keep[ids.long()] == 0  # [..., k]; never true under substitute (every slot lies in A)
    new_weights = weights.masked_fill(dropped, 0)
    if to_empty:
        new_ids = ids.masked_fill(dropped, -1)
    else:
        new_ids = _fill_ids(ids, dropped, keep)
    if record.active():
        k = ids.shape[-1] if ids.dim() else 1
        e = keep.shape[0]
        c, _ = effective_budget(_config(budget, policy, max_tokens), ids.numel() // max(k, 1), e, k)
        from .naming import block_of_weight

        record.emit(block_of_weight(router_weight, block), ids.numel() // max(k, 1), c, new_ids[new_ids >= 0], block)
    return new_ids, new_weights


@budget_apply.register_fake
def _(ids, weights, keep, to_empty, router_weight, block, budget, policy, max_tokens):
    return torch.empty_like(ids), torch.empty_like(weights)


def _setup_apply(ctx, inputs, output):
    ids, _w, keep = inputs[:3]
    ctx.save_for_backward(ids, keep)


def _backward_apply(ctx, _grad_ids, grad_weights):
    ids, keep = ctx.saved_tensors
    grad_w = grad_weights.masked_fill(keep[ids.long()] == 0, 0) if grad_weights is not None else None
    return None, grad_w, None, None, None, None, None, None, None


torch.library.register_autograd("moespec::budget_apply", _backward_apply, setup_context=_setup_apply)
