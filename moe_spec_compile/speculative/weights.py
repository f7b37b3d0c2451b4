"""Node weights: how much each token of a verify pass counts when the budget picks its C experts.

DraftTree (+ the drafter's path log-probabilities) -> w [R * N] fp32 -> msc.token_weights(w) around the pass

Legend: R rows, n tree nodes per row (root included), N padded nodes per row (>= n).

The budget ranks experts by s_e = sum_t w_t p_t,e over the pass's tokens (moe_spec_compile/budget.py).
A verify pass holds the root (certain to be used: its logits give at least the bonus token) and drafted
nodes that are only accepted if the target agrees with every node above them, so weighing all nodes
alike spends the budget on branches that are unlikely to survive. The options:

    "uniform"  every node 1
    "path"     the drafter's path probability: exp(cumulative draft log-probability), the root 1; a drafter
               that gives no probabilities (NgramDrafter) falls back to "uniform"
    "depth"    DEPTH_DECAY ** depth, the root 1

Padding nodes (N - n per row, repeating the root to fill the bucket, and every node of a finished row) weigh 0:
they change nothing in the expert choice. Scaling all weights by a constant changes nothing either (ranks and
coverage shares are relative).
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


def node_weights(tree: DraftTree, kind: str) -> torch.Tensor:
    """w [R * n] fp32 on the tree's device (rows flattened, row-major, as the pass's tokens): valid nodes weigh as
    `kind` says, padding nodes (tree.valid False: a narrower row's padding, every node of a finished row) 0."""
    if kind == "path" and tree.logprob is not None:
        w = tree.logprob.float().exp()
    elif kind == "depth":
        w = torch.full(tree.depth.shape, DEPTH_DECAY, dtype=torch.float32, device=tree.depth.device) ** tree.depth
    else:
        w = torch.ones(tree.depth.shape, dtype=torch.float32, device=tree.depth.device)
    return (w * tree.valid).reshape(-1)
