"""Argument checks of the moespec ops, shared by the torch and the Triton implementations.

caller's tensors -> check_* (shapes, dtypes, id range) -> ValueError naming the argument, or nothing

Kept free of op registrations and of Triton, so that ops, kernels and passes all import it without a cycle.
Legend: T tokens, E experts, k top-k, H hidden, I intermediate.
"""

from __future__ import annotations

import torch

__all__ = ["ACTIVATIONS", "check_fused_experts_args", "check_ids_in_range", "check_expert_lists"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_clamp")


def check_fused_experts_args(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down,
                             w_up=None) -> None:
    """Shapes and dtypes of moespec::fused_experts. With w_up, w_gate_up holds the gate rows only ([E, I, H])."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    t, h = hidden.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t:
        raise ValueError(f"topk_ids must be [T, k] with T={t}, got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must match topk_ids {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("w_gate_up must be [E, 2I, H] and w_down [E, H, I]")
    e, rows, hh = w_gate_up.shape
    if w_up is not None:
        if tuple(w_up.shape) != (e, rows, hh):
            raise ValueError(f"w_up must be shaped like the gate weights {(e, rows, hh)}, got {tuple(w_up.shape)}")
        two_i = 2 * rows
    else:
        two_i = rows
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


def check_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Every id in [-1, E). On the CPU a ValueError; on CUDA a device-side assert that fails the next
    synchronising call (no host read: the experts run once per layer per pass), and nothing while a CUDA
    graph is being captured (a replay cannot raise; the kernels skip ids outside the range there)."""
    if topk_ids.is_cuda:
        if topk_ids.numel() and not torch.cuda.is_current_stream_capturing():
            torch._assert_async(((topk_ids >= -1) & (topk_ids < num_experts)).all(),
                                f"topk_ids must lie in [-1, {num_experts}) (-1 marks an empty slot)")
        return
    if topk_ids.numel() and bool(((topk_ids < -1) | (topk_ids >= num_experts)).any()):
        bad = topk_ids[(topk_ids < -1) | (topk_ids >= num_experts)][0].item()
        raise ValueError(f"topk_ids must lie in [-1, {num_experts}) (-1 marks an empty slot); got {bad}, "
                         "outside that range")


def check_expert_lists(gate: list, up: list, down: list, hidden: torch.Tensor) -> None:
    """Per-expert 2-D weights (nn.Linear layout [out, in]): gate, up [I, H] and down [H, I], one size for all."""
    if not (len(gate) == len(up) == len(down)) or not gate:
        raise ValueError(f"gate, up and down must list the same number (>= 1) of experts, got "
                         f"{len(gate)}, {len(up)}, {len(down)}")
    h = hidden.shape[-1]
    i = gate[0].shape[0]
    for name, ws, want in (("gate", gate, (i, h)), ("up", up, (i, h)), ("down", down, (h, i))):
        for e, w in enumerate(ws):
            if tuple(w.shape) != want:
                raise ValueError(f"{name}[{e}] must be {want} like every expert's, got {tuple(w.shape)}")
