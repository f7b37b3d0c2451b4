"""Draft trees: the shapes a user asks for, and the trees drafters hand to verification.

tree= int K | TreeSpec(total_tokens, depth, top_k) | list of paths -> a shape -> drafter -> DraftTree

Legend: R rows (sequences), n tree nodes per row (node 0 is the root, the last accepted token, not yet in any KV cache),
V vocabulary, D depth. Nodes are ordered so that a parent always comes before its children.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_int, check_rank

__all__ = ["TreeSpec", "StaticTree", "DraftTree", "as_tree_shape", "ancestors"]


@dataclass(frozen=True)
class TreeSpec:
    """An EAGLE-2 style dynamic tree: at each depth expand the top_k children of the top_k best nodes
    (by cumulative draft log-probability), then keep the total_tokens best drafted nodes overall.

    ``total_tokens`` counts drafted nodes; a verify pass holds them plus the root (total_tokens + 1).
    ``TreeSpec(K, K, 1)`` is a chain of K tokens (what ``tree=K`` means)."""

    total_tokens: int
    depth: int
    top_k: int

    def __post_init__(self):
        for name in ("total_tokens", "depth", "top_k"):
            check_int(getattr(self, name), f"TreeSpec.{name}", 0)
        if self.total_tokens and (self.depth < 1 or self.top_k < 1):
            raise ValueError(f"TreeSpec with total_tokens > 0 needs depth >= 1 and top_k >= 1, got {self}")

    @property
    def max_nodes(self) -> int:
        """Drafted nodes at most (the root not counted)."""
        return min(self.total_tokens, self.candidates)

    @property
    def candidates(self) -> int:
        """Nodes the expansion produces before the final top-total_tokens cut."""
        if not self.total_tokens:
            return 0
        return self.top_k + (self.depth - 1) * self.top_k * self.top_k


@dataclass(frozen=True)
class StaticTree:
    """A fixed tree given as paths of child ranks from the root, e.g. ``[(0,), (1,), (0, 0)]``: the
    root's best and second-best children, and the best child of the best child (Medusa/EAGLE-1 style).
    Every prefix of a path must be a path too (it is added when missing)."""

    paths: tuple[tuple[int, ...], ...]

    def __init__(self, paths):
        norm = set()
        if isinstance(paths, str) or not hasattr(paths, "__iter__"):
            raise ValueError(f"tree paths must be a list of tuples of child ranks, got {paths!r}")
        for p in paths:
            if isinstance(p, str) or not isinstance(p, (tuple, list)) or not p:
                raise ValueError(f"tree paths must be non-empty tuples of child ranks (ints >= 0), got {p!r}")
            p = tuple(check_rank(r, p) for r in p)
            for i in range(1, len(p) + 1):
                norm.add(p[:i])
        object.__setattr__(self, "paths", tuple(sorted(norm, key=lambda q: (len(q), q))))

    @property
    def max_nodes(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    def parents(self) -> list[int]:
        """Parent node index of every node, root first (-1), nodes in path order."""
        index = {(): 0}
        out = [-1]
        for i, p in enumerate(self.paths, start=1):
            index[p] = i
            out.append(index[p[:-1]])
        return out


def as_tree_shape(tree) -> TreeSpec | StaticTree:
    """int K -> a chain of K drafted tokens; TreeSpec and StaticTree as they are; a list of paths -> StaticTree."""
    if isinstance(tree, (TreeSpec, StaticTree)):
        return tree
    if isinstance(tree, (list, tuple)):
        return StaticTree(tree)
    if isinstance(tree, bool) or not isinstance(tree, int):
        raise ValueError(f"tree must be an int K (a chain), a TreeSpec or a list of paths, got {tree!r}")
    k = check_int(tree, "tree", 0)
    return TreeSpec(k, k, 1)


@dataclass
class DraftTree:
    """What a drafter proposes below each row's root; all tensors live on the model's device, one row per sequence.

    tokens [R, n] int64: node tokens, tokens[:, 0] = the roots.  parents [R, n] int64: parents[:, 0] = -1 and
    parents[b, i] < i.  depth [R, n] int64: depth[:, 0] = 0.  valid [R, n] bool: False for padding nodes (a row
    with fewer nodes than the widest; valid nodes come first).  Siblings are listed in the drafter's order of
    preference (sampling acceptance tries them in that order).  logprob [R, n] fp32 or None: the drafter's
    cumulative log-probability of each node's path from the root (0 at the root), when it has one; the decoder's
    node_weights="path" weighs the nodes' tokens by its exp in the budget's expert scores.  payload [R, n] int64 or
    None: the drafter's own per-node data (ModelDrafter: where it fed each node into its KV cache); the acceptance
    reads it back for the accepted paths in the step's one host read (Acceptance.payload).  chain: every row is a
    chain (parents[b, i] = i - 1) with every node valid, as a drafter's chain draft; verification and acceptance then
    skip the ancestor walk (the ancestors are the nodes before)."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor | None = None
    logprob: torch.Tensor | None = None
    payload: torch.Tensor | None = None
    chain: bool = False

    def __post_init__(self):
        if self.valid is None:
            self.valid = torch.ones(self.tokens.shape, dtype=torch.bool, device=self.tokens.device)

    @property
    def size(self) -> int:
        """n: nodes per row, root and padding included."""
        return int(self.tokens.shape[1])

    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def root_only(cls, roots: torch.Tensor) -> DraftTree:
        """Each row's root alone (an autoregressive step): roots [R]."""
        roots = roots.reshape(-1, 1).long()
        zero = torch.zeros_like(roots)
        return cls(roots, zero - 1, zero)

    @classmethod
    def from_lists(cls, rows: list[tuple[list[int], list[int]]], device) -> DraftTree:
        """Per row (tokens, parents) lists, root first (parents[0] = -1, parents[i] < i) -> a tree padded to the
        widest row (padding: the root's token at depth 0, valid False)."""
        n = max(len(t) for t, _ in rows)
        cols = {"tokens": [], "parents": [], "depth": [], "valid": []}
        for tokens, parents in rows:
            depth = [0] * len(tokens)
            for i in range(1, len(tokens)):
                if not 0 <= parents[i] < i:
                    raise ValueError(f"node {i}: parent {parents[i]} must come before it")
                depth[i] = depth[parents[i]] + 1
            extra = n - len(tokens)
            cols["tokens"].append(tokens + tokens[:1] * extra)
            cols["parents"].append(parents + [0] * extra)
            cols["depth"].append(depth + [0] * extra)
            cols["valid"].append([True] * len(tokens) + [False] * extra)
        as_t = lambda xs, dt=torch.long: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
        return cls(as_t(cols["tokens"]), as_t(cols["parents"]), as_t(cols["depth"]), as_t(cols["valid"], torch.bool))

    def padded(self, n: int, live: torch.Tensor | None = None) -> DraftTree:
        """Every row padded to n >= size nodes, and every node of a row not live (live [R] False) made padding. A
        padding node mirrors its row's root: the root's token at depth 0 (the root's position); the decoder lets it
        see what the root sees, so it computes the root's output and, under exact routing, picks the root's experts."""
        r, extra = self.rows, n - self.size
        if extra <= 0 and live is None:
            return self
        valid = self.valid if live is None else self.valid & live[:, None]
        pad = lambda x, fill: x if extra <= 0 else torch.cat([x, fill.expand(r, extra)], 1)  # noqa: E731
        zero = self.tokens.new_zeros(1, 1)
        valid = pad(valid, torch.zeros(1, 1, dtype=torch.bool, device=valid.device))
        tokens = pad(self.tokens, self.tokens[:, :1])
        return DraftTree(torch.where(valid, tokens, tokens[:, :1]), pad(self.parents, zero),
                         torch.where(valid, pad(self.depth, zero), 0), valid,
                         None if self.logprob is None else pad(self.logprob, self.logprob.new_zeros(1, 1)),
                         None if self.payload is None else pad(self.payload, zero - 1))


def ancestors(parents: torch.Tensor, max_depth: int, out: torch.Tensor | None = None,
              chain: bool = False) -> torch.Tensor:
    """anc [R, n, n] bool: anc[b, i, j] is True when node j is node i itself or one of its ancestors in row b's tree.

    Device-side, no host sync: climb the parent pointers max_depth times, at most n - 1 (no deeper path fits in n
    nodes; a root alone climbs none) (chain: parents are known to be i - 1, so anc is the lower triangle, written at
    once). out: an [R, n, n] bool buffer to write."""
    r, n = parents.shape
    dev = parents.device
    if chain:
        tril = torch.ones(n, n, dtype=torch.bool, device=dev).tril_()
        return tril.expand(r, n, n).clone() if out is None else out.copy_(tril)
    anc = torch.zeros(r, n, n, dtype=torch.bool, device=dev) if out is None else out.zero_()
    cur = torch.arange(n, device=dev).expand(r, n).contiguous()
    anc.scatter_(2, cur[..., None], True)
    up = parents.clamp(min=0)  # the root is its own parent
    for _ in range(min(max_depth, n - 1)):
        cur = up.gather(1, cur)
        anc.scatter_(2, cur[..., None], True)
    return anc
