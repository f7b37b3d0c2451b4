"""Acceptance for a batch: each row accepts its own path of its own tree (the rules of accept.py, per row).

target logits [R, n, V] at every row's nodes -> BatchAcceptance (path per row, bonus per row, compaction order)

Legend: R rows, n nodes per row (root included, padding included), V vocabulary.

Greedy: the rule of accept.accept_greedy on every row at once, on the device (a padded node is never
correct); the host learns all rows' paths and bonus tokens in one read. Sampling: accept.accept_sample
(recursive rejection sampling over siblings) row by row on each row's real nodes: host-side Python, as
at batch size 1. Rows that are not live accept nothing (path length 0, identity order).
"""

from __future__ import annotations

import torch

from .accept import SamplingConfig, accept_sample
from .batch_drafters import BatchAcceptance, BatchTree

__all__ = ["accept_greedy_batch", "accept_sample_batch"]


def _order(on_path: torch.Tensor) -> torch.Tensor:
    """[R, n] bool -> per row the path's nodes first (index order = depth order), then the others."""
    return torch.argsort((~on_path).to(torch.int8), dim=1, stable=True)


def accept_greedy_batch(tree: BatchTree, logits: torch.Tensor, anc: torch.Tensor,
                        live: torch.Tensor) -> BatchAcceptance:
    """logits [R, n, V]; anc [R, n, n] (batch_kv.batch_ancestors); live [R] bool. One host read."""
    r, n = tree.tokens.shape
    target = logits.argmax(-1)  # [R, n]
    correct = (tree.tokens == target.gather(1, tree.parents.clamp(min=0))) & tree.valid
    correct[:, 0] = True
    ok = ~(anc & ~correct[:, None, :]).any(2)  # [R, n] every ancestor-or-self is correct
    best = torch.argmax(torch.where(ok, tree.depth, -1), dim=1)  # first deepest accepted node per row
    best = torch.where(live, best, 0)
    on_path = anc.gather(1, best[:, None, None].expand(r, 1, n))[:, 0] & live[:, None]
    order = _order(on_path)
    length = on_path.sum(1)
    bonus = target.gather(1, best[:, None])[:, 0]
    host = torch.cat([tree.tokens.gather(1, order).reshape(-1), bonus, length]).tolist()
    lengths = host[r * n + r :]
    tokens = [host[b * n : b * n + lengths[b]] for b in range(r)]
    return BatchAcceptance(on_path, best, order, length, tokens, host[r * n : r * n + r])


def accept_sample_batch(tree: BatchTree, logits: torch.Tensor, cfg: SamplingConfig, live: torch.Tensor,
                        generator: torch.Generator | None = None) -> BatchAcceptance:
    """Recursive rejection sampling (accept.accept_sample) on each live row's real nodes."""
    r, n = tree.tokens.shape
    dev = logits.device
    sizes = tree.valid.sum(1).tolist()
    on_path = torch.zeros(r, n, dtype=torch.bool)
    best, tokens, bonus = [0] * r, [[] for _ in range(r)], [0] * r
    for b, alive in enumerate(live.tolist()):
        if not alive:
            continue
        acc = accept_sample(tree.row(b, sizes[b]), logits[b, : sizes[b]], cfg, generator)
        on_path[b, acc.path] = True
        best[b], tokens[b], bonus[b] = acc.path[-1], acc.tokens, acc.bonus
    on_path = on_path.to(dev)
    return BatchAcceptance(on_path, torch.tensor(best, device=dev), _order(on_path), on_path.sum(1), tokens, bonus)
