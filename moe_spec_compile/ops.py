"""The moespec custom ops: budgeted routing and fused experts, with fake implementations.

router scores -> moespec::budget_topk -> model's own weight post-processing -> moespec::budget_apply
              -> experts (moespec::fused_experts, or the model's own experts code)

Legend: T tokens, E experts, k top-k, H hidden, I intermediate, C budget.

budget_topk replaces the router's selection ``torch.topk``; under "substitute" it takes each token's
top-k among the budget set A, so everything the model does after the top-k (renormalization, scaling,
bias-corrected gathers) stays the model's own code. budget_apply sits where the routing result
leaves the router: under "truncate" it drops slots outside A (weight 0; id -1 when the experts are
``fused_experts``, else redirected to an expert of A so that no expert outside A is ever touched).
"""

from __future__ import annotations

import torch

from . import record
from .budget import BudgetConfig, effective_budget, expert_scores, keep_top

__all__ = ["budget_topk", "budget_apply", "fused_experts_torch", "ACTIVATIONS"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_clamp")


def _config(budget: int, policy: str, max_tokens: int) -> BudgetConfig:
    return BudgetConfig(budget if budget > 0 else None, policy, max_tokens if max_tokens > 0 else None)


def _probs(scores: torch.Tensor, score_fn: str) -> torch.Tensor:
    if score_fn == "softmax":
        return torch.softmax(scores.float(), dim=-1)
    if score_fn == "identity":
        return scores
    raise ValueError(f"unknown score_fn {score_fn!r}")


@torch.library.custom_op("moespec::budget_topk", mutates_args=())
def budget_topk(
    x: torch.Tensor,  # [..., E] the tensor the model's top-k selects on
    scores: torch.Tensor,  # [..., E] router probabilities (score_fn="identity") or logits ("softmax")
    k: int,
    score_fn: str,
    budget: int,  # compile-time budget, -1: exact
    policy: str,
    max_tokens: int,  # -1: no limit
    sorted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [..., k], indices [..., k], remap [E] int64). remap[e] = e for kept experts; under
    "truncate" experts outside A map to the best expert of A (budget_apply drops those slots)."""
    e = x.shape[-1]
    num_tokens = x.numel() // e
    c, policy = effective_budget(_config(budget, policy, max_tokens), num_tokens, e, k)
    identity = torch.arange(e, device=x.device)
    if c is None:
        values, indices = torch.topk(x, k, dim=-1, sorted=sorted)
        return values, indices, identity
    s = expert_scores(_probs(scores, score_fn))  # [E]
    keep = keep_top(s, c)
    if policy == "substitute":
        # Rank A's experts above all others, even where the model itself masked them to -inf (grouped
        # top-k): such experts rank by index after A's finite ones. Ties go to the lower index.
        key = torch.where(keep, x.clamp(min=torch.finfo(x.dtype).min), float("-inf"))
        indices = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k].contiguous()
        return x.gather(-1, indices), indices, identity
    values, indices = torch.topk(x, k, dim=-1, sorted=sorted)
    best = torch.argmax(s)  # A's best expert: the target of dropped slots when the model's own experts run
    return values, indices, torch.where(keep, identity, best)


@budget_topk.register_fake
def _(x, scores, k, score_fn, budget, policy, max_tokens, sorted=True):
    shape = (*x.shape[:-1], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64), x.new_empty((x.shape[-1],), dtype=torch.int64)


@torch.library.custom_op("moespec::budget_apply", mutates_args=())
def budget_apply(
    ids: torch.Tensor,  # [..., k] the routing result as it leaves the router
    weights: torch.Tensor,  # [..., k]
    remap: torch.Tensor,  # [E] from budget_topk
    to_empty: bool,  # True: dropped slots get id -1 (fused_experts); False: redirected into A
    router_weight: torch.Tensor,  # names the block in recorded events (one graph may serve every layer)
    block: str,
    budget: int,
    policy: str,
    max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    mapped = remap[ids.long()].to(ids.dtype)
    dropped = mapped != ids
    new_weights = weights.masked_fill(dropped, 0)
    new_ids = mapped.masked_fill(dropped, -1) if to_empty else mapped
    if record.active():
        k = ids.shape[-1] if ids.dim() else 1
        e = remap.shape[0]
        c, _ = effective_budget(_config(budget, policy, max_tokens), ids.numel() // max(k, 1), e, k)
        from .naming import block_of_weight

        record.emit(block_of_weight(router_weight, block), ids.numel() // max(k, 1), c, new_ids[new_ids >= 0], block)
    return new_ids, new_weights


@budget_apply.register_fake
def _(ids, weights, remap, to_empty, router_weight, block, budget, policy, max_tokens):
    return torch.empty_like(ids), torch.empty_like(weights)


def _gate_act(gate_up: torch.Tensor, activation: str, interleaved: bool, alpha: float, limit: float) -> torch.Tensor:
    """gate_up [n, 2I] fp32 -> [n, I]: act(gate) * up, or GPT-OSS's clamped SwiGLU."""
    if interleaved:
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    if activation == "gelu":
        return torch.nn.functional.gelu(gate) * up
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(gate, approximate="tanh") * up
    if activation == "relu":
        return torch.relu(gate) * up
    if activation == "swiglu_clamp":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def check_fused_experts_args(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down):
    """Shape and dtype checks shared by the torch and Triton implementations."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    t, h = hidden.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t:
        raise ValueError(f"topk_ids must be [T, k] with T={t}, got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must match topk_ids {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("w_gate_up must be [E, 2I, H] and w_down [E, H, I]")
    e, two_i, hh = w_gate_up.shape
    if hh != h or two_i % 2:
        raise ValueError(f"w_gate_up must be [E, 2I, H={h}], got {tuple(w_gate_up.shape)}")
    if tuple(w_down.shape) != (e, h, two_i // 2):
        raise ValueError(f"w_down must be [E={e}, H={h}, I={two_i // 2}], got {tuple(w_down.shape)}")
    if b_gate_up is not None and tuple(b_gate_up.shape) != (e, two_i):
        raise ValueError(f"b_gate_up must be [E, 2I] = {(e, two_i)}, got {tuple(b_gate_up.shape)}")
    if b_down is not None and tuple(b_down.shape) != (e, h):
        raise ValueError(f"b_down must be [E, H] = {(e, h)}, got {tuple(b_down.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def fused_experts_torch(
    hidden: torch.Tensor,  # [T, H]
    topk_ids: torch.Tensor,  # [T, k], -1 = empty slot
    topk_weights: torch.Tensor,  # [T, k]
    w_gate_up: torch.Tensor,  # [E, 2I, H]
    w_down: torch.Tensor,  # [E, H, I]
    activation: str = "silu",
    b_gate_up: torch.Tensor | None = None,  # [E, 2I]
    b_down: torch.Tensor | None = None,  # [E, H]
    interleaved: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """The reference implementation: group (token, slot) pairs by expert, touch only the experts
    that received tokens, fp32 math, deterministic combine over the k slots."""
    t, h = hidden.shape
    k = topk_ids.shape[1]
    e = w_gate_up.shape[0]
    flat_ids = topk_ids.reshape(-1).long()  # [T*k]
    if bool(((flat_ids < -1) | (flat_ids >= e)).any()):
        raise ValueError(f"topk_ids must lie in [-1, {e}), got values outside it")
    slot_out = torch.zeros(t * k, h, dtype=torch.float32, device=hidden.device)  # [T*k, H]
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids[flat_ids >= 0], minlength=e).tolist()
    start = int((flat_ids < 0).sum())  # empty slots sort first
    x32 = hidden.float()
    w32 = topk_weights.reshape(-1).float()
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]  # [n] flat (token, slot) indices
        start += n
        x = x32[pairs // k]  # [n, H]
        gate_up = x @ w_gate_up[expert].float().t()  # [n, 2I]
        if b_gate_up is not None:
            gate_up = gate_up + b_gate_up[expert].float()
        y = _gate_act(gate_up, activation, interleaved, alpha, limit) @ w_down[expert].float().t()  # [n, H]
        if b_down is not None:
            y = y + b_down[expert].float()
        slot_out[pairs] = y * w32[pairs, None]
    return slot_out.view(t, k, h).sum(1).to(hidden.dtype)


@torch.library.custom_op("moespec::fused_experts", mutates_args=())
def fused_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "silu",
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    interleaved: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    impl: str = "auto",
) -> torch.Tensor:
    """out[t] = sum_j w[t,j] * w_down[e] @ act(gate[e] @ x_t) * (up[e] @ x_t), e = topk_ids[t,j] (-1: empty).

    impl: "auto" (Triton kernels on CUDA, torch elsewhere), "torch", or "triton" (also on the CPU
    under TRITON_INTERPRET=1)."""
    args = (hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down, interleaved, alpha, limit)
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "triton" or (impl == "auto" and hidden.is_cuda and _triton_launcher() is not None):
        launcher = _triton_launcher()
        if launcher is None:
            raise RuntimeError("impl='triton' but the Triton kernels are not importable here")
        return launcher(*args)
    check_fused_experts_args(*args[:8])  # the Triton launcher checks its own arguments
    return fused_experts_torch(*args)


@fused_experts.register_fake
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu", b_gate_up=None, b_down=None,
      interleaved=False, alpha=1.702, limit=7.0, impl="auto"):
    return torch.empty_like(hidden)


def _triton_launcher():
    """The Triton launcher (kernels/), or None where Triton or the kernels are unavailable."""
    try:
        from .kernels import fused_experts as launcher
    except ImportError:
        return None
    return launcher
