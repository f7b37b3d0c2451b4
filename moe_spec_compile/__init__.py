"""moespec: make speculative decoding pay off on Mixture-of-Experts models.

model --torch.compile(backend="moespec")--> MoE blocks found -> budgeted routing + fused experts
"""

from __future__ import annotations

import importlib

from . import ops  # noqa: F401  (registers the moespec:: custom ops)
from .budget import BudgetConfig, Coverage, budget, expert_stats, reset_expert_stats, token_weights
from .explain import explain
from .record import record_experts

__all__ = [
    "BudgetConfig",
    "Coverage",
    "budget",
    "expert_stats",
    "reset_expert_stats",
    "token_weights",
    "record_experts",
    "explain",
    "moespec_backend",
    "SpeculativeDecoder",
    "ModelDrafter",
    "NgramDrafter",
    "OracleDrafter",
    "SelfDrafter",
    "Eagle3Drafter",
    "Eagle3Head",
    "TreeSpec",
    "load_tiny",
    "CostModel",
    "profile",
    "offload_experts",
]

# Heavier pieces load on first use, so `import moe_spec_compile` stays cheap.
_LAZY = {
    "moespec_backend": ".backend",
    "SpeculativeDecoder": ".speculative",
    "ModelDrafter": ".speculative",
    "NgramDrafter": ".speculative",
    "OracleDrafter": ".speculative",
    "SelfDrafter": ".speculative",
    "Eagle3Drafter": ".eagle3",
    "Eagle3Head": ".eagle3",
    "TreeSpec": ".speculative",
    "load_tiny": ".tiny",
    "CostModel": ".cost",
    "profile": ".cost",
    "offload_experts": ".offload",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
