"""Acceptance: which drafted path the target agrees with, and the bonus token after it.

target logits [n, V] at every tree node -> (accepted path of node ids from the root, bonus token)

Legend: n tree nodes (node 0 = root), V vocabulary.

Greedy (do_sample=False). Node i (i >= 1) is *correct* when its token is the target's argmax at its
parent. The accepted path ends at the deepest node all of whose ancestors (itself included) are correct;
the bonus token is the target's argmax there. This is exactly what plain greedy decoding emits, token
for token. Computed on the device; the host learns the path in one read.

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
    path: list[int]  # accepted node ids, root first, in depth order
    bonus: int  # the target's token after the path's last node
    order: torch.Tensor  # [n] the path's nodes first, then the rest: the KV compaction permutation
    tokens: list[int]  # the path's tokens, root first
    payload: list[int] | None = None  # tree.payload of the path's nodes (read with the rest), when the tree has one


def process_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits [n, V] -> probabilities [n, V] after temperature, top-k and top-p (the nucleus: the
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
    """[n] bool -> the path's nodes first (index order = depth order), then the others."""
    return torch.argsort((~on_path).to(torch.int8), stable=True)


def accept_greedy(tree: DraftTree, logits: torch.Tensor, anc: torch.Tensor) -> Acceptance:
    """logits [n, V]; anc [n, n] from tree.ancestors. One host read: the path's tokens and the bonus."""
    n = tree.size
    target = logits.argmax(-1)  # [n]
    correct = tree.tokens == target[tree.parents.clamp(min=0)]
    correct[0] = True
    ok = ~(anc & ~correct[None, :]).any(1)  # [n] every ancestor-or-self is correct
    best = torch.argmax(torch.where(ok, tree.depth, -1))  # first deepest accepted node
    on_path = anc[best]
    order = _order(on_path)
    parts = [order, tree.tokens[order], target[best].reshape(1), on_path.sum().reshape(1)]
    if tree.payload is not None:
        parts.append(tree.payload[order].to(order.dtype))
    host = torch.cat(parts).tolist()
    m = host[2 * n + 1]
    payload = host[2 * n + 2 : 2 * n + 2 + m] if tree.payload is not None else None
    return Acceptance(path=host[:m], bonus=host[2 * n], order=order, tokens=host[n : n + m], payload=payload)


def accept_sample(tree: DraftTree, logits: torch.Tensor, cfg: SamplingConfig,
                  generator: torch.Generator | None = None) -> Acceptance:
    """Recursive rejection sampling over siblings (module docstring). Two host reads: the tree with its children's
    target probabilities (and payload), then the bonus token."""
    probs = process_logits(logits, cfg)  # [n, V]
    n = tree.size
    uniforms = torch.rand(n, generator=generator).to(probs.device)  # drawn on the generator's device, as before
    parts = [tree.parents.double(), tree.tokens.double(), probs[tree.parents.clamp(min=0), tree.tokens].double(),
             uniforms.double()]
    if tree.payload is not None:
        parts.append(tree.payload.double())
    host = torch.stack(parts).tolist()  # ids < 2**53 and fp32 values: exact in float64
    parents, tokens = [int(v) for v in host[0]], [int(v) for v in host[1]]
    p_child, uniforms = host[2], host[3]  # p_parent(token) per node; one uniform per node
    children: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):
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
            break
        node = nxt
        path.append(node)
    row = probs[node]
    if rejected:
        cut = row.clone()
        cut[torch.tensor(rejected, device=row.device)] = 0
        row = torch.where(cut.sum() > 0, cut, row)  # rounding can leave no mass: the target's own row is the answer
    bonus = int(torch.multinomial(row.cpu() if generator is not None else row, 1, generator=generator))
    on_path = torch.zeros(n, dtype=torch.bool, device=logits.device)
    on_path[torch.tensor(path, device=logits.device)] = True
    payload = [int(host[4][i]) for i in path] if tree.payload is not None else None
    return Acceptance(path=path, bonus=bonus, order=_order(on_path), tokens=[tokens[i] for i in path],
                      payload=payload)
