"""Node weights: how much each token of a verify pass counts when the budget picks its C experts.

DraftTree (+ the drafter's path log-probabilities) -> w [N] fp32 -> msc.token_weights(w) around the pass

Legend: n tree nodes (root included), N padded pass size (>= n).

The budget ranks experts by s_e = sum_t w_t p_t,e over the pass's tokens (moe_spec_compile/budget.py).
A verify pass holds the root (certain to be used: its logits give at least the bonus token) and drafted
nodes that are only accepted if the target agrees with every node above them, so weighing all nodes
alike spends the budget on branches that are unlikely to survive. The options:

    "uniform"  every node 1
    "path"     the drafter's path probability: exp(cumulative draft log-probability), the root 1; a drafter
               that gives no probabilities (NgramDrafter) falls back to "uniform"
    "depth"    DEPTH_DECAY ** depth, the root 1

Padding rows (N - n of them, repeating the root to fill the bucket) always weigh 0: they change nothing in
the expert choice. Scaling all weights by a constant changes nothing either (ranks and coverage shares
are relative).
"""

from __future__ import annotations

import torch

from .tree import DraftTree

__all__ = ["NODE_WEIGHTS", "DEFAULT_NODE_WEIGHTS", "DEPTH_DECAY", "node_weights", "validate_node_weights"]

NODE_WEIGHTS = ("uniform", "path", "depth")
# benchmarks/results/node_weights_cpu.md (`python -P benchmarks/bench_node_weights.py`): teacher-forced argmax
# agreement with exact decoding summed over C = E/4, E/8 and a chain of 4 / a 24-node tree. Old pair: depth
# 333.4, uniform 327.4, path 321.9; retrained pair (4 prompts): uniform 386.1, depth 384.6, path 383.1, within
# noise, depth best or tied at C = E/4 on both.
DEFAULT_NODE_WEIGHTS = "depth"
DEPTH_DECAY = 0.5


def validate_node_weights(value) -> str:
    if value not in NODE_WEIGHTS:
        raise ValueError(f"node_weights must be one of {NODE_WEIGHTS}, got {value!r}")
    return value


def node_weights(tree: DraftTree, kind: str, padded: int) -> torch.Tensor:
    """w [padded] fp32 on the tree's device: the first tree.size entries weigh the nodes, the rest are 0."""
    n = tree.size
    if kind == "path" and tree.logprob is not None:
        w = tree.logprob.float().exp()
    elif kind == "depth":
        w = torch.full((n,), DEPTH_DECAY, dtype=torch.float32, device=tree.tokens.device) ** tree.depth.float()
    else:
        w = torch.ones(n, dtype=torch.float32, device=tree.tokens.device)
    return torch.cat([w, w.new_zeros(padded - n)])
