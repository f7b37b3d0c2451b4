"""The moespec custom ops, registered on import: routing ops (routing_ops.py) and experts ops (experts_op.py).

router scores -> moespec::budget_topk -> model's own weight post-processing -> moespec::budget_apply
              -> experts (moespec::fused_experts / moespec::fused_experts_list, or the model's own code;
                 moespec::offloaded_experts where the experts were offloaded, moe_spec_compile.offload)
"""

from __future__ import annotations

from .checks import ACTIVATIONS, check_fused_experts_args
from .experts_op import fused_experts, fused_experts_list, fused_experts_torch
from .offload import offloaded_experts
from .routing_ops import budget_apply, budget_topk

__all__ = ["budget_topk", "budget_apply", "fused_experts", "fused_experts_list", "fused_experts_torch",
           "offloaded_experts", "check_fused_experts_args", "ACTIVATIONS"]
