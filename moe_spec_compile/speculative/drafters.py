"""Drafters: propose a token tree below each row's root for the target to verify.

start(prompts [R, L], pad) -> [draft(roots, shape, live) -> DraftTree [R, n] -> accept(acceptance, live)] per step;
select(rows) keeps the rows still live (packing into a smaller rows bucket)

The interface (subclass :class:`Drafter`, or :class:`RowDrafter` for host-side drafters written per sequence):

    start(input_ids [R, L], pad: list[int], max_len)
        new sequences: R left-padded prompts (row b's first pad[b] tokens are padding); at most max_len slots
    draft(roots: list[int], shape, live: list[bool]) -> DraftTree [R, n]
        roots: each row's newest token (emitted by the target, in no KV cache yet); shape: a TreeSpec or a
        StaticTree; at most shape.max_nodes drafted nodes per row (fewer, even none, is fine: DraftTree.valid);
        rows not live are ignored (their nodes are never verified)
    accept(acc: Acceptance, live: list[bool])
        what each live row accepted: acc.paths[b] (node ids, root first), acc.tokens[b] (their tokens),
        acc.bonus[b] (the next root), acc.payload[b] (DraftTree.payload at the path, when the tree carried one)
    skip(roots: list[int], live: list[bool])
        a step ran without drafting (autoregressive, chosen by the controller): the roots were committed by the
        target without a draft; catch up lazily (default: nothing to do)
    select(rows: list[int])
        keep rows `rows` (in that order; a row may repeat) for the next steps

A drafter that reads the target's own hidden states (EAGLE-3) names them in ``feature_layers`` (hidden_states
indices); the decoder then has its verify passes return them, no second target forward, and passes
``features=`` to start ([R, L, F]: the prompt's, by slot), accept ([R, n, F]: the path's nodes in path order,
acc.order's first) and skip ([R, 1, F]: the root's).

All rows share the tree *shape* but not the tree: a ModelDrafter row expands its own best nodes, an n-gram row
looks up its own history.

Legend: R rows, V vocabulary, K top_k, D depth, F drafted nodes fed through the draft model in one step, W tokens
fed per row at a step's first feed, G candidate nodes (gids).
"""

from __future__ import annotations

import contextlib
import random
import time
from functools import partial

import torch

from . import buckets
from .accept import Acceptance
from .buckets import VerifyRunner, compile_pass
from .checks import check_int
from .kv import Masks, TreeCache, forward, takes_cache_position
from .tree import DraftTree, StaticTree, TreeSpec

__all__ = ["Drafter", "RowDrafter", "ModelDrafter", "NgramDrafter", "OracleDrafter", "SelfDrafter"]


class Drafter:
    """Base class documenting the drafter interface (see the module docstring)."""

    feature_layers: tuple[int, ...] | None = None  # the target's hidden_states a drafter reads (EAGLE-3)

    def start(self, input_ids: torch.Tensor, pad: list[int], max_len: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement Drafter.start")

    def draft(self, roots: list[int], shape: TreeSpec | StaticTree, live: list[bool]) -> DraftTree:
        raise NotImplementedError(f"{type(self).__name__} does not implement Drafter.draft")

    def accept(self, acc: Acceptance, live: list[bool]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement Drafter.accept")

    def skip(self, roots: list[int], live: list[bool]) -> None:
        """A step without a draft committed the roots (the controller chose autoregressive decoding)."""

    def select(self, rows: list[int]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement Drafter.select")


class RowDrafter(Drafter):
    """A host-side drafter written for one sequence, run row by row: subclasses implement start_row(tokens) ->
    state, draft_row(state, root, shape) -> (tokens, parents) root first, accept_row(state, tokens) (the accepted
    path's tokens, root first, then the bonus) and skip_row(state, root)."""

    device = torch.device("cpu")

    def start(self, input_ids: torch.Tensor, pad: list[int], max_len: int) -> None:
        self.device = input_ids.device
        self.rows = [self.start_row(row[p:]) for row, p in zip(input_ids.tolist(), pad)]

    def draft(self, roots: list[int], shape: TreeSpec | StaticTree, live: list[bool]) -> DraftTree:
        return DraftTree.from_lists([self.draft_row(s, root, shape) if alive else ([root], [-1])
                                     for s, root, alive in zip(self.rows, roots, live)], self.device)

    def accept(self, acc: Acceptance, live: list[bool]) -> None:
        for s, tokens, bonus, alive in zip(self.rows, acc.tokens, acc.bonus, live):
            if alive:
                self.accept_row(s, tokens + [bonus])

    def skip(self, roots: list[int], live: list[bool]) -> None:
        for s, root, alive in zip(self.rows, roots, live):
            if alive:
                self.skip_row(s, root)

    def select(self, rows: list[int]) -> None:
        self.rows = [self.rows[i] for i in rows]


class ModelDrafter(Drafter):
    """A small causal LM sharing the target's vocabulary drafts every row's tree, one tree level per forward for
    all rows.

    Its [R, ...] KV cache (kv.TreeCache, one per rows bucket) holds each row's committed tokens at the slots the
    target uses (left padding included) and is kept in step with the accepted tokens: tree nodes it fed while
    drafting sit after each row's prefix; accept() moves the accepted ones into place (one device compaction for all
    rows, none when they already are, as in a chain) and queues the rest (at most the path's last node, plus the
    bonus) for the next draft's first feed. That feed gives every row W tokens: its queued tokens and root, after a
    re-feed of its last committed tokens when it has fewer queued (their KV is recomputed in place), so no row needs a
    host branch of its own. Drafting is greedy on the draft's log-probabilities whatever the target samples with;
    sampling acceptance keeps the target's distribution exact regardless (accept.py).

    compile: run the draft model's forward through ``torch.compile`` (inductor, dynamic shapes: one graph serves
    every feed length; the first drafts compile, tens of seconds on a small CPU). False by default;
    ``SpeculativeDecoder(compile=True)`` turns it on when its target compiles through inductor. A compiled draft
    only changes what is proposed, never what is emitted (verification decides).
    cuda_graphs: on a CUDA device, each drafting pass shape (rows, tokens) is captured once into a CUDA graph and
    replayed (buckets.VerifyRunner without a budget: static input buffers per shape, the cache written in place);
    None (the default) turns it on for a compiled drafter on CUDA. The prompts' feed runs without a graph. Never on
    the CPU."""

    def __init__(self, model, vocab_size: int | None = None, compile: bool = False, cuda_graphs: bool | None = None):
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.cache: TreeCache | None = None
        self.caches: dict[int, TreeCache] = {}  # rows bucket -> its cache (CUDA graphs read fixed buffers)
        self.max_len = 0
        self._cache_position = takes_cache_position(model)
        self._run_model = self.model
        self._runner = None  # the drafting passes' runner (CUDA graphs per pass shape), made with the caches
        self._fed_buffers: dict = {}  # (R, F) -> the fed nodes' ancestors [R, F, F] and positions [R, F]
        self._chains: dict = {}  # (depth, device) -> a chain's parents, depths, fed ids (_draft_chain)
        self._chain_fn = None  # _chain_steps compiled (a compiled drafter's chains)
        self._chain_graphs: dict = {}  # (rows, W, steps) -> static inputs, CUDA graph, outputs (_chain)
        self._chain_pool = None
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be a bool, got {compile!r}")
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be None or a bool, got {cuda_graphs!r}")
        self._cuda_graphs = cuda_graphs
        if compile:
            self.compile()

    def compile(self) -> ModelDrafter:
        """Compile the draft's forward (inductor, dynamic shapes); idempotent."""
        if self._run_model is self.model:
            self._run_model = compile_pass(self.model, dynamic=True)
            self._runner = None  # rebuilt around the compiled forward
        return self

    @property
    def cuda_graphs(self) -> bool:
        """Whether drafting passes replay CUDA graphs (on a CUDA device only)."""
        on = self.compiled if self._cuda_graphs is None else self._cuda_graphs
        return on and self.device.type == "cuda"

    @property
    def compiled(self) -> bool:
        return self._run_model is not self.model

    @property
    def device(self):
        return next(self.model.parameters()).device

    # --- interface ---------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, pad: list[int] | None = None, max_len: int | None = None) -> None:
        r, length = input_ids.shape
        pad = [0] * r if pad is None else list(pad)
        max_len = max_len or length + 64
        if max_len > self.max_len:
            self.max_len = -(-max_len // 64) * 64
            self.caches.clear()
            self._runner = None
            self._chain_graphs.clear()  # captured on the caches just dropped
            self._chain_pool = None
            self.masks = Masks(self.model, self.max_len)
        dev = self.device
        self.cache = self._cache_for(r)
        self.cache.set_pad(pad)
        slots = torch.arange(length, device=dev).expand(r, length)
        pos = (slots - self.cache.pad_t[:, None]).clamp(min=0)
        self._run(input_ids.to(dev), pos, self.masks.prompt(pad, length), slots, graph=False)
        self.cache.lengths = [length] * r
        self.committed = input_ids.tolist()  # per row: the token at each slot of its prefix
        self.pending: list[list[int]] = [[] for _ in range(r)]  # accepted but never fed (next feed's first tokens)

    @torch.no_grad()
    def draft(self, roots: list[int], shape: TreeSpec | StaticTree, live: list[bool] | None = None) -> DraftTree:
        live = [True] * len(roots) if live is None else live
        roots_t = torch.tensor(roots, dtype=torch.long, device=self.device)
        if isinstance(shape, TreeSpec) and shape.top_k == 1 and shape.total_tokens == shape.depth > 0:
            return self._draft_chain(roots_t, self._plan_feed(roots, live), shape.depth)
        root_logp = self._first_feed(roots, live)  # commits the pending tokens and the roots
        if shape.max_nodes == 0:
            self._num_fed = 0
            tree = DraftTree.root_only(roots_t)
            tree.payload = torch.full_like(tree.tokens, -1)
            return tree
        if isinstance(shape, TreeSpec):
            return self._draft_dynamic(roots_t, root_logp, shape)
        return self._draft_static(roots_t, root_logp, shape)

    def accept(self, acc: Acceptance, live: list[bool] | None = None) -> None:
        """acc.payload: each path node's fed id (-1: never fed), as DraftTree.payload carried it. The fed nodes of a
        path are a prefix of it (every inner node was expanded)."""
        c = self.cache
        live = [True] * c.rows if live is None else live
        used = [[f for f in fed[1:] if f >= 0] if alive else [] for fed, alive in zip(acc.payload, live)]
        if any(u != list(range(len(u))) for u in used):  # else already in place (a chain, a tree's first branch)
            order = [u + [f for f in range(self._num_fed) if f not in u] for u in used]
            c.compact(torch.tensor(order, device=self.device), self._base_t)
        for b, (u, alive) in enumerate(zip(used, live)):
            if alive:
                tokens = acc.tokens[b]
                c.lengths[b] = self._base[b] + len(u)
                self.committed[b] += tokens[1 : 1 + len(u)]
                self.pending[b] = tokens[1 + len(u) :]

    def skip(self, roots: list[int], live: list[bool] | None = None) -> None:
        for b, (root, alive) in enumerate(zip(roots, live or [True] * len(roots))):
            if alive:
                self.pending[b].append(root)  # fed, with the others, at the next draft's first feed

    def select(self, rows: list[int]) -> None:
        cache = self._cache_for(len(rows))
        cache.copy_rows(self.cache, rows)
        self.cache = cache
        self.committed = [list(self.committed[i]) for i in rows]
        self.pending = [list(self.pending[i]) for i in rows]

    # --- helpers -----------------------------------------------------------------------------------
    def _cache_for(self, r: int) -> TreeCache:
        if r not in self.caches:
            self.caches[r] = TreeCache.for_model(self.model, self.max_len, self.device, rows=r)
        return self.caches[r]

    _pass_hidden = None  # hidden_states indices the drafting passes also return (kv.forward)

    def _passes(self) -> VerifyRunner:
        """The drafting passes' runner, (re)made around the current forward when it changed."""
        if self._runner is None:
            self._runner = VerifyRunner(self._run_model, self.cuda_graphs, self._cache_position, budgeted=False,
                                        hidden=self._pass_hidden)
        return self._runner

    def _run(self, tokens, positions, mask, slots, fed_parent=None, first_fed: int = 0, graph: bool = True):
        """Every drafting forward goes through here -> logits [R, n, V]: tokens [R, n] at positions and slots [R, n].
        fed_parent: the fed id of each token's parent (-1: the root), [R, n]; None for committed tokens (the prompt,
        a first feed); first_fed: the fed id of the first token. graph=False: a plain forward (the prompt's feed).
        A chain's steps do not come here (_chain)."""
        if not graph:
            return forward(self._run_model, self.cache, tokens, positions, mask, slots, self._cache_position)
        return self._passes()(self.cache, tokens, positions, mask, slots)

    def _logp(self, logits: torch.Tensor) -> torch.Tensor:
        return _log_probs(logits, self.vocab_size)

    def _first_feed(self, roots: list[int], live: list[bool]) -> torch.Tensor:
        """Feed each row its queued tokens and root (_plan_feed) causally after its prefix -> the roots' log-probs
        [R, V]."""
        c = self.cache
        tokens, slots = self._plan_feed(roots, live)
        mask = self.masks.causal(slots[:, 0], c.pad_t, slots.shape[1], buffered=True)
        logits = self._run(tokens, slots - c.pad_t[:, None], mask, slots)
        return self._logp(logits[:, -1])

    def _plan_feed(self, roots: list[int], live: list[bool]):
        """A step's first feed, planned on the host: each row's queued tokens and root (W per row, re-feeding
        committed tokens where a row has fewer queued) at slots start[b] .. start[b] + W - 1 -> (tokens [R, W],
        their slots [R, W]). Commits them: the rows' lengths, the drafted nodes' base slots
        and the roots' positions are set for the feed that follows."""
        c, dev = self.cache, self.device
        w = 1 + max((len(p) for p, alive in zip(self.pending, live) if alive), default=0)
        start, tokens = [], []
        for b, root in enumerate(roots):
            again = max(w - 1 - len(self.pending[b]), 0)
            s = max(c.lengths[b] - again, 0)
            feed = (self.committed[b][s : c.lengths[b]] + self.pending[b] + [root])[-w:]
            start.append(s)
            tokens.append([root] * (w - len(feed)) + feed)
            if live[b]:
                self.committed[b] = self.committed[b][:s] + feed
                self.pending[b] = []
        start_t = torch.tensor(start, device=dev)
        c.lengths = [s + w if alive else n for s, n, alive in zip(start, c.lengths, live)]
        self._base = list(c.lengths)  # drafted nodes are fed after here (fed id f at slot base + f)
        self._base_t = start_t + w
        self._root_pos = (self._base_t - 1 - c.pad_t)[:, None]  # [R, 1] the roots' positions (slot base - 1)
        return torch.tensor(tokens, device=dev), start_t[:, None] + torch.arange(w, device=dev)

    def _begin_tree(self, rows: int, max_fed: int) -> None:
        """The fed nodes' ancestors [R, F, F] and positions [R, F]: buffers allocated once per (R, F), cleared per
        tree."""
        self._num_fed = 0
        key = (rows, max_fed, self.device)
        if key not in self._fed_buffers:
            self._fed_buffers[key] = (torch.zeros(rows, max_fed, max_fed, dtype=torch.bool, device=self.device),
                                      torch.zeros(rows, max_fed, dtype=torch.long, device=self.device))
        self._fed_anc, self._fed_pos = self._fed_buffers[key]
        self._fed_anc.zero_()
        self._fed_pos.zero_()

    def _feed_level(self, tokens: torch.Tensor, fed_parent: torch.Tensor, depth: int) -> torch.Tensor:
        """Feed one tree level: tokens [R, m] whose parents are fed nodes fed_parent [R, m] (-1: the root, which is
        committed) -> log-probs [R, m, V]. The level's nodes get fed ids num_fed .. num_fed+m-1."""
        c, dev = self.cache, self.device
        r, m = tokens.shape
        cap = self._fed_anc.shape[1]
        f = self._num_fed + torch.arange(m, device=dev)  # [m]
        rows = self._fed_anc.gather(1, fed_parent.clamp(min=0)[..., None].expand(r, m, cap))
        rows &= (fed_parent >= 0)[..., None]  # [R, m, F]
        rows[:, torch.arange(m, device=dev), f] = True
        self._fed_anc[:, f] = rows
        pos = (self._root_pos + depth).expand(r, m).contiguous()
        self._fed_pos[:, f] = pos
        mask = self.masks.tree(rows, self._base, c.pad, pos, self._fed_pos)
        logits = self._run(tokens, pos, mask, self._base_t[:, None] + f, fed_parent, self._num_fed)
        self._num_fed += m
        return self._logp(logits)

    def _draft_chain(self, roots: torch.Tensor, feed, depth: int) -> DraftTree:
        """A chain (TreeSpec(K, K, 1)): the first feed (_plan_feed's), then each drafted token is the argmax after
        the one before, fed as a plain causal one-token step at the next slot (a chain's tree mask is the causal
        mask). The feed and the depth - 1 steps run as one call (_chain); the same tree as _draft_dynamic with
        top_k=1 (ties: the lowest id)."""
        dev, r = self.device, roots.shape[0]
        tokens, slots = feed
        lps, toks = self._chain(tokens, slots, self._feed_inputs(slots), depth - 1)  # [R, depth] each
        self._num_fed = depth - 1
        meta = self._chains.get((depth, dev))
        if meta is None:  # parents, depths and fed ids of a chain of this depth (root -1, last node never fed)
            meta = self._chains[(depth, dev)] = (torch.arange(-1, depth, device=dev)[None],
                                                 torch.arange(depth + 1, device=dev)[None],
                                                 torch.tensor([[-1, *range(depth - 1), -1]], device=dev))
        parents, depths, fed = (t.expand(r, depth + 1) for t in meta)
        logprob = torch.cat([lps.new_zeros(r, 1), lps.cumsum(1)], 1)
        return DraftTree(torch.cat([roots[:, None], toks], 1), parents, depths, logprob=logprob, payload=fed,
                         chain=True)

    _whole_chain = True  # a compiled drafter compiles its chains into one graph (SelfDrafter: each pass alone)

    def _feed_inputs(self, slots: torch.Tensor) -> dict | None:
        """What the model takes beside committed tokens at slots [R, n] (EAGLE-3: the target's features), None for a
        plain LM."""
        return None

    def _chain(self, tokens: torch.Tensor, slots: torch.Tensor, inputs: dict | None, steps: int):
        """The first feed (tokens [R, W] at slots [R, W], contiguous per row) and the chain's steps after it ->
        (log-probs, tokens) [R, steps + 1]: one call of _chain_steps, compiled as a whole where the drafter compiles
        (inductor, dynamic shapes: a graph per steps), else its loop over the drafting forward; captured into one
        CUDA graph per (rows, W, steps) where the drafter's passes replay graphs (static inputs copied in, the cache
        written in place)."""
        c = self.cache
        # the feed's slots first (kv.forward does it again): the call meets one shape of cache.slots whatever pass ran
        # before it (a prompt's feed, a tree level), so a compiled chain's guards do not see the previous pass
        c.write_at(slots)
        args = (tokens, slots, inputs)
        fn, model, buffered = _chain_steps, self._run_model, True  # eager steps: masks in Masks' buffers
        if self.compiled and self._whole_chain:
            if self._chain_fn is None:  # its own frame (compile_pass), always called with this drafter's model;
                # dynamic shapes (as the drafter's forward): one graph per chain length for every feed width W > 1,
                # rows count and cache size, not a compile per W or cache growth in the middle of decoding
                self._chain_fn = compile_pass(_chain_steps, dynamic=True)
            fn, model, buffered = self._chain_fn, self.model, False
        run = partial(fn, model, c, self.masks, steps=steps, cache_position=self._cache_position,
                      hidden=self._pass_hidden, vocab=self.vocab_size, buffered=buffered)
        if not self.cuda_graphs:
            return run(*args)
        key = (c.rows, tokens.shape[1], steps)
        if key not in self._chain_graphs:
            buf = (tokens.clone(), slots.clone(), None if inputs is None else {k: v.clone() for k, v in inputs.items()})
            if self._chain_pool is None:
                self._chain_pool = torch.cuda.graph_pool_handle()
            self._chain_graphs[key] = (buf, *buckets.capture_graph(lambda: run(*buf), self._chain_pool))
        buf, graph, out = self._chain_graphs[key]
        buf[0].copy_(tokens)
        buf[1].copy_(slots)
        for k, v in (inputs or {}).items():
            buf[2][k].copy_(v)
        graph.replay()
        return out

    def _draft_dynamic(self, roots: torch.Tensor, root_logp: torch.Tensor, spec: TreeSpec) -> DraftTree:
        """EAGLE-2 per row: expand the top_k children of the row's top_k best frontier nodes per level (scores are
        cumulative draft log-probs), then keep the row's total_tokens best candidates. Candidate ids (gid): 0 is the
        root; a parent always has a lower gid than its children and a score >= theirs, so a stable sort by score
        keeps every kept node's parent."""
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
        logprob = torch.cat([root_logp.new_zeros(r, 1), all_score], 1).gather(1, gid)
        return DraftTree(all_tok.gather(1, gid), tree_parents, all_depth[gid], logprob=logprob,
                         payload=gid_fed.gather(1, gid))

    def _draft_static(self, roots: torch.Tensor, root_logp: torch.Tensor, shape: StaticTree) -> DraftTree:
        """Fixed tree, the same for every row: node (r_1, .., r_d) takes the r_d-th best token at its parent in its
        row. Every level's inner nodes are fed in one forward for all rows."""
        dev, r = self.device, roots.shape[0]
        parents = shape.parents()  # host, root first
        n = len(parents)
        paths = ((),) + shape.paths
        inner = sorted({p for p in parents[1:]})
        self._begin_tree(r, max(len(inner) - 1, 1))
        tokens = torch.zeros(r, n, dtype=torch.long, device=dev)
        tokens[:, 0] = roots
        logprob = torch.zeros(r, n, dtype=torch.float32, device=dev)  # cumulative draft log-prob of each path
        fed_id = {0: -1}
        logp_of = {0: root_logp}  # node -> [R, V]
        for d in range(1, shape.depth + 1):
            level = [i for i in range(1, n) if len(paths[i]) == d]
            need = max(paths[i][-1] for i in level) + 1
            top = {p: logp_of[p].topk(need, dim=-1) for p in {parents[i] for i in level}}  # [R, need] each
            for i in level:
                lp, idx = top[parents[i]]
                tokens[:, i] = idx[:, paths[i][-1]]
                logprob[:, i] = logprob[:, parents[i]] + lp[:, paths[i][-1]]
            feed = [i for i in level if i in inner]
            if feed:
                fp = torch.tensor([fed_id[parents[i]] for i in feed], device=dev).expand(r, len(feed))
                base = self._num_fed
                logp = self._feed_level(tokens[:, feed], fp, d)
                for j, i in enumerate(feed):
                    fed_id[i], logp_of[i] = base + j, logp[:, j]
        tree = DraftTree.from_lists([([0] * n, parents)], dev)
        fed = torch.tensor([[fed_id.get(i, -1) for i in range(n)]], device=dev).expand(r, n)
        return DraftTree(tokens, tree.parents.expand(r, n), tree.depth.expand(r, n), logprob=logprob, payload=fed)


def _log_probs(logits: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """Log-probabilities over the first `vocab` logits (all of them for None), in fp32."""
    if vocab:
        logits = logits[..., :vocab]
    return torch.log_softmax(logits.float(), -1)


def _chain_steps(model, cache: TreeCache, masks: Masks, tokens: torch.Tensor, slots: torch.Tensor,
                 inputs: dict | None, steps: int, cache_position: bool = False, hidden: tuple[int, ...] | None = None,
                 vocab: int | None = None, buffered: bool = False):
    """A chain's drafting: the first feed, tokens [R, W] at slots [R, W] (contiguous per row; positions slot - pad,
    causal over each row's prefix; inputs: the model's other inputs for them), whose last token is the root; then
    `steps` greedy one-token passes, each feeding the token drafted before at the next slot (Masks.causal: device ops
    only, so the whole call traces into one graph) -> (log-probs, tokens) [R, steps + 1]. When the model returns
    hidden states (an EAGLE-3 head's output feature), each step feeds the one before's as its features. buffered: the
    masks go to Masks' buffers (an eager loop), not fresh tensors (a compiled graph)."""
    positions = slots - cache.pad_t[:, None]
    lps, toks = [], []
    for _ in range(steps + 1):
        out = forward(model, cache, tokens, positions, masks.causal(slots[:, 0], cache.pad_t, slots.shape[1], buffered),
                      slots, cache_position, hidden, inputs)
        logits, h = out if hidden is not None else (out, None)
        lp, tok = _log_probs(logits[:, -1], vocab).max(-1)
        lps.append(lp)
        toks.append(tok)
        tokens, positions, slots = tok[:, None], positions[:, -1:] + 1, slots[:, -1:] + 1
        inputs = None if h is None else {"features": h[:, -1:]}
    return torch.stack(lps, 1), torch.stack(toks, 1)


class NgramDrafter(RowDrafter):
    """Prompt lookup: find the longest n-gram (max_ngram down to min_ngram) ending the context that
    occurred before, and propose what followed it. With a TreeSpec of top_k > 1 (or a StaticTree),
    several earlier occurrences are merged into a trie; no model runs. Host-side Python."""


    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_matches: int = 16):
        check_int(max_ngram, "max_ngram", 1)
        check_int(min_ngram, "min_ngram", 1)
        check_int(max_matches, "max_matches", 1)
        if not min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.max_matches = max_ngram, min_ngram, max_matches

    def start_row(self, tokens: list[int]) -> dict:
        state = {"history": [], "index": {}}  # index: n-gram -> positions just after it
        self._extend(state, tokens)
        return state

    def _extend(self, state: dict, tokens: list[int]) -> None:
        history, index = state["history"], state["index"]
        for t in tokens:
            history.append(t)
            end = len(history)
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    index.setdefault(tuple(history[end - n :]), []).append(end)

    def _continuations(self, state: dict, ctx: list[int], depth: int) -> list[list[int]]:
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(ctx) < n:
                continue
            ends = [e for e in state["index"].get(tuple(ctx[-n:]), []) if e < len(ctx)]
            if ends:
                return [ctx[e : e + depth] for e in reversed(ends[-self.max_matches :])]
        return []

    def draft_row(self, state: dict, root: int, shape) -> tuple[list[int], list[int]]:
        ctx = state["history"] + [root]
        depth, total = shape.depth, shape.max_nodes
        branch = shape.top_k if isinstance(shape, TreeSpec) else 1 + max((p[-1] for p in shape.paths), default=0)
        tokens, parents, children = [root], [-1], [{}]
        for cont in self._continuations(state, ctx, depth):
            node = 0
            for t in cont:
                if t in children[node]:
                    node = children[node][t]
                    continue
                if len(tokens) - 1 >= total or len(children[node]) >= branch:
                    break
                children[node][t] = len(tokens)
                tokens.append(t)
                parents.append(node)
                children.append({})
                node = len(tokens) - 1
        return tokens, parents

    def accept_row(self, state: dict, tokens: list[int]) -> None:
        self._extend(state, tokens[:-1])

    def skip_row(self, state: dict, root: int) -> None:
        self._extend(state, [root])


class SelfDrafter(ModelDrafter):
    """SpecMoE's self-assisted drafting for a target whose experts are offloaded (msc.offload_experts): the target
    drafts for itself with every MoE layer restricted to the experts resident in its pool (the budget's substitute
    rule over the resident set: each token's top-k among them), so drafting needs no second model and loads nothing.
    The verify pass runs the target as usual (exact, or under the decoder's budget) and loads the experts it misses
    once each. Its KV cache is its own (ModelDrafter's), in step with the accepted tokens.

    The drafting passes run the target compiled by the moespec backend (inner eager, dynamic shapes) under a budget of
    R, the pool's size; before the first draft each layer gets at least top-k experts resident (loaded once).
    Under offload policy "lfu+draft", what each drafting pass's router wanted (its tokens' own top-k before the
    restriction) becomes each layer's draft scores: the verify pass that follows evicts experts the draft did not ask
    for first (off by default: measured no gain, offload.DRAFT_WEIGHT).
    prefetch: after each drafting pass, the experts its router wanted (its own top-k before the restriction, about
    what the verify pass of these tokens will need) start loading in a worker thread, evicting by the policy among
    experts not wanted; the verify pass waits for them (OffloadHandle.prefetch). Off by default: on the CPU it raised
    the hit rate (0.84 -> 0.87) but moved 1.6-1.7x the bytes (a quarter of the prefetches unused, and what they
    evicted loaded again), benchmarks/results/offload_cpu.md."""

    def __init__(self, target, vocab_size: int | None = None, prefetch: bool = False):
        base = getattr(target, "_orig_mod", target)
        handle = getattr(base, "_moespec_offload_handle", None)
        if handle is None or handle.restored:
            raise ValueError("SelfDrafter drafts with an offloaded target's resident experts: call "
                             "msc.offload_experts(target, resident=R) first")
        k = base.config.get_text_config(decoder=True).num_experts_per_tok
        small = [name for name, b in handle.blocks.items() if b.resident < k]
        if small:
            raise ValueError(f"SelfDrafter needs at least top-k = {k} resident experts per layer; {small[0]} keeps "
                             f"{handle.blocks[small[0]].resident}")
        super().__init__(base, vocab_size=vocab_size, cuda_graphs=False)  # its passes may load: never captured
        if not isinstance(prefetch, bool):
            raise ValueError(f"prefetch must be a bool, got {prefetch!r}")
        self.handle, self.top_k, self.prefetch = handle, k, prefetch
        self.hints = any(b.cache.policy == "lfu+draft" for b in handle.blocks.values())
        handle.collect_wanted = handle.collect_wanted or prefetch or self.hints  # the draft's wanted experts
        self.resident = max(b.resident for b in handle.blocks.values())
        options = {"inner": "eager", "policy": "substitute", "max_budget_tokens": None}
        self._run_model = compile_pass(base, "moespec", dynamic=True, options=options)

    def start(self, input_ids, pad=None, max_len=None) -> None:
        for b in self.handle.blocks.values():
            b.warm(self.top_k)
        super().start(input_ids, pad, max_len)

    _whole_chain = False  # its passes run under host-side scopes (resident experts, budget, prefetch): one by one

    @contextlib.contextmanager
    def _scope(self):
        """Drafting passes see only the resident experts, under a budget of the pool's size; after them, the experts
        their routers wanted start loading (prefetch) or rank the next evictions (hints)."""
        from ..budget import budget

        with self.handle.resident_only(), budget(self.resident):
            yield
        if self.prefetch:  # the experts these passes' routers wanted start loading while the step goes on
            self.handle.prefetch()
        elif self.hints:  # policy "lfu+draft": they rank above the others when the verify pass evicts
            self.handle.hint()

    def _run(self, *args, **kwargs):
        with self._scope():
            return super()._run(*args, **kwargs)

    def _chain(self, *args, **kwargs):
        with self._scope():  # a chain's steps: one scope, prefetch once after them (hint() sums what they wanted)
            return super()._chain(*args, **kwargs)


class OracleDrafter(RowDrafter):
    """For benchmarks: proposes the target's own greedy continuation, each drafted token replaced by a wrong
    one with probability 1 - acceptance (independently per position), so the target-side cost of
    speculation can be measured at a chosen acceptance without a trained draft.

        oracle = OracleDrafter(target, acceptance=0.9, seed=0)
        oracle.precompute(prompts, max_new_tokens)   # optional: the greedy runs, untimed, ahead

    The continuation comes from the target's own greedy ``generate`` (uncompiled, exact), run for
    ``horizon`` tokens at a time from the current context: once per prompt when precomputed, again
    whenever the context leaves the reference (a budgeted target may emit other tokens). The seconds
    spent there are kept in ``reference_seconds`` (they land in the decoder's draft time). A depth-d chain
    is the main path (a chain of d tokens, so greedy acceptance follows MoESD's chain law with alpha =
    acceptance); a TreeSpec or StaticTree with more nodes is filled with wrong siblings along it, so the
    verify pass has the shape's size. The wrong tokens are drawn with ``seed`` (reset per sequence)."""

    def __init__(self, target, acceptance: float = 1.0, seed: int = 0, horizon: int = 64,
                 vocab_size: int | None = None):
        if isinstance(acceptance, bool) or not isinstance(acceptance, int | float) or not 0 <= acceptance <= 1:
            raise ValueError(f"acceptance must be a number in [0, 1], got {acceptance!r}")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
        self.target = getattr(target, "_orig_mod", target)
        self.acceptance, self.seed, self.horizon = float(acceptance), seed, horizon
        self.vocab_size = vocab_size
        self.reference_seconds = 0.0
        self._refs: dict[tuple[int, ...], list[int]] = {}  # prompt -> prompt + greedy continuation

    @torch.no_grad()
    def greedy(self, context: list[int], n: int) -> list[int]:
        """context + the target's next n greedy tokens (transformers' generate, exact, no EOS stop)."""
        t0 = time.perf_counter()
        dev = next(self.target.parameters()).device
        ids = torch.tensor([context], device=dev)
        out = self.target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
        self.reference_seconds += time.perf_counter() - t0
        return out[0].tolist()

    def precompute(self, prompts, max_new_tokens: int) -> None:
        """Run the reference greedy decoding of each prompt [L] or [1, L] now (so it is not timed later)."""
        for p in prompts:
            ctx = torch.as_tensor(p).reshape(-1).tolist()
            self._refs[tuple(ctx)] = self.greedy(ctx, max_new_tokens + 1)  # the last steps draft shorter chains

    def start_row(self, tokens: list[int]) -> dict:
        return {"history": tokens, "ref": self._refs.get(tuple(tokens), tokens), "rng": random.Random(self.seed)}

    def _reference(self, state: dict, ctx: list[int], depth: int) -> list[int]:
        """The reference tokens after ctx (depth of them), recomputed where ctx left the reference."""
        n = len(ctx)
        if state["ref"][:n] != ctx or len(state["ref"]) <= n:  # left the reference, or at its end: extend from here
            state["ref"] = self.greedy(ctx, max(self.horizon, depth))
        return state["ref"][n : n + depth]  # near a precomputed end: a shorter chain

    def draft_row(self, state: dict, root: int, shape) -> tuple[list[int], list[int]]:
        ctx = state["history"] + [root]
        total, depth = shape.max_nodes, min(shape.depth, shape.max_nodes)
        if total == 0 or depth == 0:
            return [root], [-1]
        vocab = self.vocab_size or self.target.config.get_text_config(decoder=True).vocab_size
        rng = state["rng"]
        wrong = lambda right: (right + 1 + rng.randrange(vocab - 1)) % vocab  # noqa: E731
        right = self._reference(state, ctx, depth)
        chain = [t if rng.random() < self.acceptance else wrong(t) for t in right]
        tokens, parents = [root] + chain, [-1] + list(range(len(chain)))
        d = 0
        while len(tokens) - 1 < total and d < 16 * total:  # fill: wrong siblings of the chain's nodes
            node = 1 + d % len(chain)
            taken = {tokens[i] for i in range(1, len(tokens)) if parents[i] == parents[node]}
            t = wrong(right[node - 1])
            if t not in taken:
                tokens.append(t)
                parents.append(parents[node])
            d += 1
        return tokens, parents

    def accept_row(self, state: dict, tokens: list[int]) -> None:
        state["history"] = state["history"] + tokens[:-1]

    def skip_row(self, state: dict, root: int) -> None:
        state["history"] = state["history"] + [root]
