"""Budget state and the MoE-Spec budget semantics, in plain torch.

scores [T, E] -> s_e = sum_t p_t,e -> A = top-C experts (ties: lower index) -> remap table [E]

Legend: T tokens of the pass, E experts, k top-k, C budget.

The compile-time budget (``options={"budget": ...}``) is baked into each rewritten router as op
arguments; ``with budget(...)`` overrides it at run time (thread-local, nestable). The custom ops in
``ops.py`` resolve the two with :func:`effective_budget` on every call.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

__all__ = ["POLICIES", "BudgetConfig", "budget", "budget_set", "effective_budget", "validate_budget"]

POLICIES = ("substitute", "truncate")
_UNSET = object()


def validate_budget(value, name: str = "budget") -> int | None:
    """None, or an int >= 1. bool and float are refused (a float budget is almost always a mistake)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= 1 or None, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def validate_policy(value) -> str:
    if value not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {value!r}")
    return value


def validate_max_tokens(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_budget_tokens must be an int >= 1 or None, got {value!r}")
    return value


@dataclass(frozen=True)
class BudgetConfig:
    """What a router does on one pass: budget None = exact; passes with more tokens than
    max_budget_tokens (prefill) stay exact."""

    budget: int | None = None
    policy: str = "substitute"
    max_budget_tokens: int | None = 256

    def __post_init__(self):
        validate_budget(self.budget)
        validate_policy(self.policy)
        validate_max_tokens(self.max_budget_tokens)


class _State(threading.local):
    def __init__(self):
        self.stack: list[dict] = []


_state = _State()


@contextlib.contextmanager
def budget(c=_UNSET, policy: str | None = None, max_budget_tokens=_UNSET):
    """Override the compile-time budget at run time: ``with msc.budget(16, policy="truncate"): ...``.

    ``budget(None)`` forces exact routing. Arguments left out keep the enclosing (or compile-time) value.
    """
    frame = {}
    if c is not _UNSET:
        frame["budget"] = validate_budget(c)
    if policy is not None:
        frame["policy"] = validate_policy(policy)
    if max_budget_tokens is not _UNSET:
        frame["max_budget_tokens"] = validate_max_tokens(max_budget_tokens)
    _state.stack.append(frame)
    try:
        yield
    finally:
        _state.stack.pop()


def effective_budget(compiled: BudgetConfig, num_tokens: int, num_experts: int, top_k: int) -> tuple[int | None, str]:
    """(C, policy) for one pass: C None means exact; otherwise C is clamped to [k, E] and C == E is exact."""
    values = {"budget": compiled.budget, "policy": compiled.policy, "max_budget_tokens": compiled.max_budget_tokens}
    for frame in _state.stack:
        values.update(frame)
    c, max_tokens = values["budget"], values["max_budget_tokens"]
    if c is None or (max_tokens is not None and num_tokens > max_tokens):
        return None, values["policy"]
    c = min(max(c, top_k), num_experts)
    if c >= num_experts:
        return None, values["policy"]
    return c, values["policy"]


def budget_set(probs: torch.Tensor, c: int) -> torch.Tensor:
    """The budget set A as a bool mask [E]: the C experts with the highest summed probability.

    probs [..., E]: each token's router probabilities. Ties go to the lower index: topk on the
    scores is not stable, so rank by (score, -index) through a stable descending sort.
    """
    return keep_top(expert_scores(probs), c)


def expert_scores(probs: torch.Tensor) -> torch.Tensor:
    """s_e = sum over the pass's tokens of each expert's router probability: [..., E] -> [E] fp32."""
    return probs.reshape(-1, probs.shape[-1]).float().sum(0)


def keep_top(scores: torch.Tensor, c: int) -> torch.Tensor:
    """Bool mask [E] of the C highest scores; a stable sort keeps equal scores in index order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    keep[order[:c]] = True
    return keep
