"""Acceptance: which drafted path the target agrees with, and the bonus token after it.

target logits [R, n, V] at every row's tree nodes -> per row (accepted path of node ids from the root, bonus token)

Legend: R rows, n tree nodes per row (node 0 = root, padding included), V vocabulary.

Greedy (do_sample=False). Node i (i >= 1) is *correct* when its token is the target's argmax at its
parent. The accepted path ends at the deepest node all of whose ancestors (itself included) are correct;
the bonus token is the target's argmax there (a padding node is never correct). This is exactly what plain
greedy decoding emits, token for token. Computed on the device for all rows; the host learns every row's path in
one read. Rows that are not live accept nothing (path length 0, identity order).

Sampling (do_sample=True): recursive rejection sampling over siblings, with every drafted child taken as
a point-mass proposal. At node u let r = p_u, the target's distribution there after temperature and
top-p/top-k. Try u's children c_1, c_2, ... in the drafter's order:
    accept c_i with probability r(x_i) (x_i its token); on acceptance move to c_i and start over there;
    on rejection set r(x_i) = 0 and renormalize r, then try c_{i+1}.
When no child is accepted (or u is a leaf), emit the bonus token ~ r and stop.
Why this keeps the target's distribution exactly: one try is speculative sampling with the proposal
q = delta(x): accept with min(1, r(x)/q(x)) = r(x), else draw from norm(max(r - q, 0)) = r with x
removed. So P(emit x) = r(x) and P(emit y != x) = (1 - r(x)) * r(y) / (1 - r(x)) = r(y): the emitted
token ~ r whatever x was, and the residual after a rejection is exactly r conditioned on "not x", which
is what the next sibling is tested against. Chained over the accepted path, every emitted token is
distributed as the target's next-token distribution given the tokens before it. No draft probabilities
are needed, so this holds for any drafter (greedy top-k trees, n-gram lookup, sampled drafts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_sampling
from .tree import DraftTree

__all__ = ["Acceptance", "SamplingConfig", "accept_greedy", "accept_sample", "process_logits"]


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None

    def __post_init__(self):
        check_sampling(self.do_sample, self.temperature, self.top_p, self.top_k)


@dataclass
class Acceptance:
    """What each row accepted. Device: on_path [R, n] bool, best [R] (the path's deepest node), order [R, n] (the
    KV compaction permutation: the path's nodes first), length [R] (path nodes, root included; 0 for rows not live).
    Host, per row: paths[b] (node ids, root first), tokens[b] (the path's tokens), bonus[b] (the next root) and
    payload[b] (tree.payload at the path's nodes, when the tree has one); [] and 0 for rows not live."""

    on_path: torch.Tensor
    best: torch.Tensor
    order: torch.Tensor
    length: torch.Tensor
    paths: list[list[int]]
    tokens: list[list[int]]
    bonus: list[int]
    payload: list[list[int]] | None = None
    nodes: int = 0  # valid nodes of the live rows: the tokens that voted in the pass


def process_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V] after temperature, top-k and top-p (the nucleus: the
    smallest set of most likely tokens whose mass reaches top_p, as transformers' TopPLogitsWarper)."""
    x = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum <= 1 - cfg.top_p
        drop[..., -1] = False  # keep at least the most likely token
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x.softmax(-1)


def _order(on_path: torch.Tensor) -> torch.Tensor:
    """[R, n] bool -> per row the path's nodes first (index order = depth order), then the others."""
    return torch.argsort((~on_path).to(torch.int8), dim=1, stable=True)


def _split(host: list, r: int, n: int, lengths: list[int]) -> list[list[int]]:
    return [host[b * n : b * n + lengths[b]] for b in range(r)]


def accept_greedy(tree: DraftTree, logits: torch.Tensor, anc: torch.Tensor, live: torch.Tensor | None) -> Acceptance:
    """logits [R, n, V]; anc [R, n, n] (tree.ancestors); live [R] bool, or None when every row is live and the tree
    has no padding nodes. One host read."""
    r, n = tree.tokens.shape
    valid = tree.valid if live is None else tree.valid & live[:, None]
    if n == 1:  # roots only (an autoregressive step): each live row's bonus is the argmax at its root
        parts = [logits[:, 0].argmax(-1), tree.tokens[:, 0], valid[:, 0].long(),
                 tree.tokens[:, 0] * 0 - 1 if tree.payload is None else tree.payload[:, 0]]
        host = torch.cat(parts).tolist()
        bonus, roots, alive, fed = host[:r], host[r : 2 * r], host[2 * r : 3 * r], host[3 * r :]
        keep = lambda x: [[v] if a else [] for v, a in zip(x, alive)]  # noqa: E731
        return Acceptance(valid, torch.zeros(r, dtype=torch.long, device=logits.device), torch.zeros_like(
            tree.tokens), valid[:, 0].long(), keep([0] * r), keep(roots), bonus,
            keep(fed) if tree.payload is not None else None, sum(alive))
    target = logits.argmax(-1)  # [R, n]
    if live is None and tree.chain:  # node i's parent is i - 1: the path is the longest correct prefix, in order
        return _accept_chain(tree, target)
    correct = tree.tokens == target.gather(1, tree.parents.clamp(min=0))
    if live is not None:
        correct &= valid
    correct[:, 0] = True
    ok = ~(anc & ~correct[:, None, :]).any(2)  # [R, n] every ancestor-or-self is correct
    best = torch.argmax(torch.where(ok, tree.depth, -1), dim=1)  # first deepest accepted node per row
    on_path = anc.gather(1, best[:, None, None].expand(r, 1, n))[:, 0]
    if live is not None:
        best = torch.where(live, best, 0)
        on_path = anc.gather(1, best[:, None, None].expand(r, 1, n))[:, 0] & live[:, None]
    order = _order(on_path)
    length = on_path.sum(1)
    bonus = target.gather(1, best[:, None])[:, 0]
    parts = [order.reshape(-1), tree.tokens.gather(1, order).reshape(-1), bonus, length]
    if live is not None:
        parts.append(valid.sum().reshape(1))
    if tree.payload is not None:
        parts.append(tree.payload.gather(1, order).reshape(-1))
    host = torch.cat(parts).tolist()
    m, t = r * n, 2 * r * n
    lengths, rest = host[t + r : t + 2 * r], host[t + 2 * r :]
    nodes = r * n if live is None else rest.pop(0)
    payload = _split(rest, r, n, lengths) if tree.payload is not None else None
    return Acceptance(on_path, best, order, length, _split(host, r, n, lengths), _split(host[m:], r, n, lengths),
                      host[t : t + r], payload, nodes)


def _accept_chain(tree: DraftTree, target: torch.Tensor) -> Acceptance:
    """accept_greedy for chains with every row live and every node valid: the same Acceptance without the ancestor
    matrix (node i is correct when its token is the target's argmax at node i - 1; the path is the correct prefix,
    already first in order). One host read."""
    r, n = tree.tokens.shape
    correct = torch.cat([torch.ones_like(target[:, :1]), (tree.tokens[:, 1:] == target[:, :-1]).long()], 1)
    on_path = correct.cumprod(1).bool()
    length = on_path.sum(1)
    best = length - 1
    bonus = target.gather(1, best[:, None])[:, 0]
    parts = [tree.tokens.reshape(-1), bonus, length]
    if tree.payload is not None:
        parts.append(tree.payload.reshape(-1))
    host = torch.cat(parts).tolist()
    m = r * n
    lengths = host[m + r : m + 2 * r]
    payload = _split(host[m + 2 * r :], r, n, lengths) if tree.payload is not None else None
    order = torch.arange(n, device=target.device).expand(r, n)
    return Acceptance(on_path, best, order, length, [list(range(k)) for k in lengths], _split(host, r, n, lengths),
                      host[m : m + r], payload, m)


def accept_sample(tree: DraftTree, logits: torch.Tensor, cfg: SamplingConfig, live: torch.Tensor | None,
                  generator: torch.Generator | None = None) -> Acceptance:
    """Recursive rejection sampling over siblings (module docstring) on each live row's valid nodes. Two host
    reads: every row's tree with its children's target probabilities (and payload), then the bonus tokens."""
    probs = process_logits(logits, cfg)  # [R, n, V]
    r, n = tree.tokens.shape
    dev = logits.device
    live = torch.ones(r, dtype=torch.bool, device=dev) if live is None else live
    uniforms = torch.rand(r, n, generator=generator).to(dev)  # drawn on the generator's device
    p_child = probs[torch.arange(r, device=dev)[:, None], tree.parents.clamp(min=0), tree.tokens]  # p_parent(token)
    parts = [tree.parents, tree.tokens, p_child, uniforms, tree.valid, live[:, None].expand(r, n)]
    if tree.payload is not None:
        parts.append(tree.payload)
    host = torch.stack([p.double() for p in parts], 1).tolist()  # [R][parts][n]; ids < 2**53: exact in float64
    paths, tokens, rejected_rows, payload, nodes = [], [], [], [], 0
    for b in range(r):
        parents, toks, p, u, valid, alive = host[b][:6]
        size = int(sum(valid)) if alive[0] else 0
        nodes += size
        path, rejected = _sample_path([int(v) for v in parents[:size]], [int(v) for v in toks[:size]], p, u) \
            if size else ([], [])
        paths.append(path)
        tokens.append([int(toks[i]) for i in path])
        rejected_rows.append(rejected)
        payload.append([int(host[b][6][i]) for i in path] if tree.payload is not None else None)
    best = [path[-1] if path else 0 for path in paths]
    rows = probs[torch.arange(r, device=dev), torch.tensor(best, device=dev)]  # [R, V]: each path end's distribution
    cut = rows.clone()
    for b, rejected in enumerate(rejected_rows):
        if rejected:
            cut[b, torch.tensor(rejected, device=dev)] = 0
    rows = torch.where(cut.sum(-1, keepdim=True) > 0, cut, rows)  # rounding can leave no mass: the target's own row
    bonus = torch.multinomial(rows.cpu() if generator is not None else rows, 1, generator=generator)[:, 0].tolist()
    on_path = torch.zeros(r, n, dtype=torch.bool)
    for b, path in enumerate(paths):
        on_path[b, path] = True
    on_path = on_path.to(dev)
    return Acceptance(on_path, torch.tensor(best, device=dev), _order(on_path), on_path.sum(1), paths, tokens,
                      bonus, payload if tree.payload is not None else None, nodes)


def _sample_path(parents: list[int], tokens: list[int], p_child: list[float], uniforms: list[float]):
    """One row's recursive rejection sampling -> (accepted path, tokens rejected at its last node)."""
    children: list[list[int]] = [[] for _ in parents]
    for i in range(1, len(parents)):
        children[parents[i]].append(i)
    node, path = 0, [0]
    while True:
        rejected: list[int] = []
        residual = 1.0  # mass of r before renormalization
        nxt = None
        for c in children[node]:
            if tokens[c] in rejected:
                continue  # r(x) is already 0: a duplicate is always rejected
            if residual > 0 and uniforms[c] * residual < p_child[c]:
                nxt = c
                break
            rejected.append(tokens[c])
            residual -= p_child[c]
        if nxt is None:
            return path, rejected
        node = nxt
        path.append(node)
