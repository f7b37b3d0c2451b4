"""Triton kernels of moespec, installed as moe_spec_compile.kernels (the CUDA implementation of the ops).

routing -> align by expert -> gate_up GEMM + act -> down GEMM x weight -> combine   (fused_moe.py)

Importing this package imports Triton; where Triton is missing the ImportError propagates and
moespec::fused_experts falls back to its torch implementation.
"""

from .config import ENV_VAR
from .fused_moe import fused_experts, select_config
from .routing import RoutingMeta, align_by_expert

__all__ = ["fused_experts", "select_config", "align_by_expert", "RoutingMeta", "ENV_VAR"]
