"""Batched drafters: every row of the batch drafts its own tree below its own root, in one pass per level.

start(prompts [R, L], pad [R]) -> [draft(roots [R], shape, live [R]) -> BatchTree -> accept(BatchAcceptance)]
per step; select(rows) packs the rows that are still live into a smaller batch.

Legend: R rows, L prompt length (left padding included), n nodes per row (root included), V vocabulary,
K top_k, D depth, F drafted nodes fed through the draft model per step, G candidate nodes (gids).

All rows share the tree *shape* (a chain, a TreeSpec or a StaticTree) but not the tree: a ModelDrafter row
expands its own best nodes, an n-gram row looks up its own history. Trees with fewer nodes than the widest
row are padded (``BatchTree.valid`` False): a padded node mirrors the root (pad_tree); the decoder gives it
weight 0 in the budget's expert scores and acceptance never takes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch_kv import BatchCache, BatchMasks, batch_forward
from .drafters import ModelDrafter, NgramDrafter
from .kv import takes_cache_position
from .tree import DraftTree, StaticTree, TreeSpec

__all__ = ["BatchTree", "BatchAcceptance", "BatchModelDrafter", "BatchNgramDrafter", "batch_drafter_for",
           "pad_tree", "pad_trees"]


@dataclass
class BatchTree:
    """Per-row draft trees padded to n nodes: tokens, parents, depth [R, n] int64 (parents[:, 0] = -1,
    parents[b, i] < i), valid [R, n] bool (False: padding). Valid nodes of a row come first."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def max_depth(self) -> int:
        return int(self.depth.max()) if self.depth.numel() else 0

    def row(self, b: int, n: int) -> DraftTree:
        """Row b's first n nodes as a DraftTree."""
        return DraftTree(self.tokens[b, :n], self.parents[b, :n], self.depth[b, :n])


@dataclass
class BatchAcceptance:
    """What each row accepted. Device: on_path [R, n] bool, best [R] (the path's deepest node), order [R, n]
    (the KV compaction permutation: path first), length [R] (path nodes, root included; 0 for dead rows).
    Host: tokens[b] (the path's tokens, root first; [] for dead rows) and bonus[b] (the next root)."""

    on_path: torch.Tensor
    best: torch.Tensor
    order: torch.Tensor
    length: torch.Tensor
    tokens: list[list[int]]
    bonus: list[int]


def pad_tree(tree: BatchTree, n: int) -> BatchTree:
    """Pad every row to n nodes. A padding node mirrors its row's root: the root's token at the root's depth
    (position), and the decoder lets it attend what the root attends (batched.BatchedGenerator.verify), so it
    computes the root's output and, under exact routing, picks the root's experts: no extra expert traffic."""
    r, m = tree.tokens.shape
    if m >= n:
        return tree
    dev, extra = tree.tokens.device, n - m
    zeros = torch.zeros(r, extra, dtype=torch.long, device=dev)
    return BatchTree(torch.cat([tree.tokens, tree.tokens[:, :1].expand(r, extra)], 1),
                     torch.cat([tree.parents, zeros], 1), torch.cat([tree.depth, zeros], 1),
                     torch.cat([tree.valid, zeros.bool()], 1))


def pad_trees(trees: list[DraftTree], device) -> BatchTree:
    """Stack per-row trees, each padded to the widest (pad_tree)."""
    n = max(t.size for t in trees)
    rows = [pad_tree(BatchTree(t.tokens.to(device)[None], t.parents.to(device)[None], t.depth.to(device)[None],
                               torch.ones(1, t.size, dtype=torch.bool, device=device)), n) for t in trees]
    return BatchTree(*(torch.cat(parts) for parts in zip(*((x.tokens, x.parents, x.depth, x.valid) for x in rows))))


def batch_drafter_for(drafter):
    """The batched counterpart of a batch-1 drafter (sharing its model or its settings)."""
    if isinstance(drafter, ModelDrafter):
        return BatchModelDrafter(drafter.model, drafter.vocab_size)
    if isinstance(drafter, NgramDrafter):
        return BatchNgramDrafter(drafter.max_ngram, drafter.min_ngram, drafter.max_matches)
    raise ValueError(f"batched generation (input_ids with more than one row) supports ModelDrafter and "
                     f"NgramDrafter drafters, got {type(drafter).__name__}; generate row by row instead")


class BatchModelDrafter:
    """ModelDrafter for a batch: one forward of the draft model per tree level covers every row.

    Its [R, ...] cache holds each row's committed tokens at the slots the target uses (left padding
    included). A draft step first feeds two tokens per row: the row's pending token (the accepted path's
    last node, when the draft model never fed it) or else the last committed token again (its KV is
    recomputed in place), then the root; so every row feeds the same count and no host branch is needed.
    Tree levels then go to slots after each row's prefix; accept() moves each row's fed path nodes into
    place with one device compaction (batch_kv.BatchCache.compact)."""

    def __init__(self, model, vocab_size: int | None = None):
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.cache: BatchCache | None = None
        self._cache_position = takes_cache_position(model)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, pad: torch.Tensor, max_len: int) -> None:
        r, length = input_ids.shape
        dev = self.device
        self.cache = BatchCache.for_model(self.model, r, max_len, dev)
        self.masks = BatchMasks(self.model, max_len)
        self.cache.pad.copy_(pad)
        mask = self.masks.prompt(pad, length)
        slots = torch.arange(length, device=dev).expand(r, length)
        pos = (slots - pad[:, None]).clamp(min=0)
        batch_forward(self.model, self.cache, input_ids, pos, mask, slots, self._cache_position)
        self.cache.lengths.fill_(length)
        self.last = input_ids[:, -1].clone()  # [R] pending token, or the last committed one
        self.has_pending = torch.zeros(r, dtype=torch.bool, device=dev)

    @torch.no_grad()
    def draft(self, roots: torch.Tensor, shape: TreeSpec | StaticTree, live: torch.Tensor) -> BatchTree:
        c = self.cache
        start = c.lengths - 1 + self.has_pending.long()  # [R] where the two fed tokens go
        tokens = torch.stack([self.last, roots], 1)  # [R, 2]
        slots = start[:, None] + torch.arange(2, device=roots.device)
        pos = slots - c.pad[:, None]
        anc = torch.ones(2, 2, dtype=torch.bool, device=roots.device).tril().expand(roots.shape[0], 2, 2)
        logits = batch_forward(self.model, c, tokens, pos, self.masks.tree(anc, start, c.pad, pos, pos), slots,
                               self._cache_position)
        c.lengths.copy_(torch.where(live, start + 2, c.lengths))
        root_logp = self._logp(logits[:, 1])  # [R, V]
        if isinstance(shape, TreeSpec):
            tree = self._draft_dynamic(roots, root_logp, shape)
        else:
            tree = self._draft_static(roots, root_logp, shape)
        self._tokens = tree.tokens
        return tree

    def accept(self, acc: BatchAcceptance, live: torch.Tensor) -> None:
        c = self.cache
        fed = self._node_fed  # [R, n] fed id of each node, -1 when never fed
        cap = self._fed_anc.shape[1]
        if self._num_fed:
            take = acc.on_path[:, : fed.shape[1]] & (fed >= 0) & live[:, None]
            used = torch.zeros(fed.shape[0], cap + 1, dtype=torch.bool, device=fed.device)
            used = used.scatter(1, torch.where(take, fed, cap), True)[:, :cap]  # [R, F]
            c.compact(torch.argsort((~used).to(torch.int8), dim=1, stable=True), c.lengths)
            c.lengths += used.sum(1)
        best_fed = fed.gather(1, acc.best[:, None])[:, 0]
        self.has_pending = live & (acc.best > 0) & (best_fed < 0)
        self.last = torch.where(live, self._tokens.gather(1, acc.best[:, None])[:, 0], self.last)

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` [R'] (in that order) for the next steps."""
        self.cache = self.cache.select(rows)
        self.last = self.last.index_select(0, rows)
        self.has_pending = self.has_pending.index_select(0, rows)

    # --- helpers -----------------------------------------------------------------------------------
    def _logp(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_size:
            logits = logits[..., : self.vocab_size]
        return torch.log_softmax(logits.float(), -1)

    def _begin_tree(self, rows: int, max_fed: int) -> None:
        dev = self.device
        self._num_fed = 0
        self._fed_anc = torch.zeros(rows, max_fed, max_fed, dtype=torch.bool, device=dev)  # [R, F, F]
        self._fed_pos = torch.zeros(rows, max_fed, dtype=torch.long, device=dev)  # [R, F]

    def _feed_level(self, tokens: torch.Tensor, fed_parent: torch.Tensor, depth: int) -> torch.Tensor:
        """Feed one level: tokens [R, m] whose parents are fed nodes fed_parent [R, m] (-1: the root, which
        is committed) -> log-probs [R, m, V]. The level's nodes get fed ids num_fed .. num_fed+m-1."""
        c, dev = self.cache, self.device
        r, m = tokens.shape
        cap = self._fed_anc.shape[1]
        f = self._num_fed + torch.arange(m, device=dev)  # [m]
        rows = self._fed_anc.gather(1, fed_parent.clamp(min=0)[..., None].expand(r, m, cap))
        rows &= (fed_parent >= 0)[..., None]  # [R, m, F]
        rows[:, torch.arange(m, device=dev), f] = True
        self._fed_anc[:, f] = rows
        pos = (c.lengths - 1 - c.pad + depth)[:, None].expand(r, m)  # the root sits at slot length - 1
        self._fed_pos[:, f] = pos
        mask = self.masks.tree(rows, c.lengths, c.pad, pos, self._fed_pos)
        logits = batch_forward(self.model, c, tokens, pos, mask, c.lengths[:, None] + f[None], self._cache_position)
        self._num_fed += m
        return self._logp(logits)

    def _draft_dynamic(self, roots: torch.Tensor, root_logp: torch.Tensor, spec: TreeSpec) -> BatchTree:
        """EAGLE-2 per row (drafters.ModelDrafter._draft_dynamic with a batch dimension): expand the top_k
        children of each row's top_k best frontier nodes per level, keep each row's total_tokens best."""
        k, dev, r = spec.top_k, self.device, roots.shape[0]
        self._begin_tree(r, k * (spec.depth - 1))
        score, tok = root_logp.topk(k)  # [R, K]
        scores, toks, parents, depths = [score], [tok], [torch.zeros(r, k, dtype=torch.long, device=dev)], [1]
        fed_of = []
        front_gid = torch.arange(1, k + 1, device=dev).expand(r, k)
        front_score, front_tok = score, tok
        front_fed_parent = torch.full((r, k), -1, dtype=torch.long, device=dev)
        next_gid = k + 1
        for d in range(1, spec.depth):
            fed_ids = self._num_fed + torch.arange(k, device=dev)  # [K]
            fed_of.append((front_gid, fed_ids))
            top_lp, top_tok = self._feed_level(front_tok, front_fed_parent, d).topk(k, dim=-1)  # [R, K, K]
            child_score = (front_score[..., None] + top_lp).reshape(r, k * k)
            child_gid = next_gid + torch.arange(k * k, device=dev)
            scores.append(child_score)
            toks.append(top_tok.reshape(r, k * k))
            parents.append(front_gid.repeat_interleave(k, dim=1))
            depths.append(d + 1)
            best = torch.sort(child_score, dim=1, descending=True, stable=True).indices[:, :k]  # [R, K]
            front_gid, front_score = child_gid[best], child_score.gather(1, best)
            front_tok = toks[-1].gather(1, best)
            front_fed_parent = fed_ids.repeat_interleave(k)[best]
            next_gid += k * k
        all_score = torch.cat(scores, 1)  # [R, G-1], gids 1..G-1
        keep = torch.sort(all_score, dim=1, descending=True, stable=True).indices[:, : spec.total_tokens]
        gid = torch.cat([torch.zeros(r, 1, dtype=torch.long, device=dev), torch.sort(keep, 1).values + 1], 1)
        n = gid.shape[1]
        all_tok = torch.cat([roots[:, None], *toks], 1)  # [R, G]
        all_parent = torch.cat([torch.full((r, 1), -1, dtype=torch.long, device=dev), *parents], 1)
        all_depth = torch.cat([torch.zeros(1, dtype=torch.long, device=dev)]
                              + [torch.full((t.shape[1],), d, dtype=torch.long, device=dev)
                                 for t, d in zip(toks, depths)])  # [G]
        local = torch.full((r, next_gid), -1, dtype=torch.long, device=dev)
        local.scatter_(1, gid, torch.arange(n, device=dev).expand(r, n))
        par = all_parent.gather(1, gid)
        tree_parents = torch.where(par >= 0, local.gather(1, par.clamp(min=0)), -1)
        gid_fed = torch.full((r, next_gid), -1, dtype=torch.long, device=dev)
        for gids, fed in fed_of:
            gid_fed.scatter_(1, gids, fed.expand(r, k))
        self._node_fed = gid_fed.gather(1, gid)
        return BatchTree(all_tok.gather(1, gid), tree_parents, all_depth[gid],
                         torch.ones(r, n, dtype=torch.bool, device=dev))

    def _draft_static(self, roots: torch.Tensor, root_logp: torch.Tensor, shape: StaticTree) -> BatchTree:
        """Fixed tree, the same for every row: node (r_1, .., r_d) takes the r_d-th best token at its parent
        in its row. Every level's inner nodes are fed in one forward for all rows."""
        dev, r = self.device, roots.shape[0]
        parents = shape.parents()  # host, root first
        n = len(parents)
        paths = ((),) + shape.paths
        inner = sorted({p for p in parents[1:]})
        self._begin_tree(r, max(len(inner) - 1, 1))
        tokens = torch.zeros(r, n, dtype=torch.long, device=dev)
        tokens[:, 0] = roots
        fed_id = {0: -1}
        logp_of = {0: root_logp}  # node -> [R, V]
        for d in range(1, shape.depth + 1):
            level = [i for i in range(1, n) if len(paths[i]) == d]
            need = max(paths[i][-1] for i in level) + 1
            top = {p: logp_of[p].topk(need, dim=-1).indices for p in {parents[i] for i in level}}  # [R, need]
            for i in level:
                tokens[:, i] = top[parents[i]][:, paths[i][-1]]
            feed = [i for i in level if i in inner]
            if feed:
                fp = torch.tensor([fed_id[parents[i]] for i in feed], device=dev).expand(r, len(feed))
                base = self._num_fed
                logp = self._feed_level(tokens[:, feed], fp, d)
                for j, i in enumerate(feed):
                    fed_id[i], logp_of[i] = base + j, logp[:, j]
        tree = DraftTree.from_lists([0] * n, parents, dev)
        self._node_fed = torch.tensor([fed_id.get(i, -1) for i in range(n)], device=dev).expand(r, n)
        return BatchTree(tokens, tree.parents.expand(r, n), tree.depth.expand(r, n),
                         torch.ones(r, n, dtype=torch.bool, device=dev))


class BatchNgramDrafter:
    """Prompt lookup per row (drafters.NgramDrafter on each row's own history, padding stripped): host-side
    Python, as the batch-1 drafter; the trees are stacked and padded to the widest row's."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_matches: int = 16):
        self.settings = (max_ngram, min_ngram, max_matches)
        self.rows: list[NgramDrafter] = []

    def start(self, input_ids: torch.Tensor, pad: torch.Tensor, max_len: int) -> None:
        self.device = input_ids.device
        self.rows = []
        for b, p in enumerate(pad.tolist()):
            d = NgramDrafter(*self.settings)
            d.start(input_ids[b : b + 1, p:], max_len)
            self.rows.append(d)

    def draft(self, roots: torch.Tensor, shape: TreeSpec | StaticTree, live: torch.Tensor) -> BatchTree:
        trees = [d.draft(root, shape) if alive else DraftTree.root_only(torch.tensor(root))
                 for d, root, alive in zip(self.rows, roots.tolist(), live.tolist())]
        return pad_trees(trees, self.device)

    def accept(self, acc: BatchAcceptance, live: torch.Tensor) -> None:
        for d, tokens, bonus, alive in zip(self.rows, acc.tokens, acc.bonus, live.tolist()):
            if alive:
                d.accept([], tokens + [bonus])

    def select(self, rows: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in rows.tolist()]
