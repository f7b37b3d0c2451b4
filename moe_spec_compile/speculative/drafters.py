"""Drafters: propose a token tree below the root for the target to verify.

start(prompt) -> [draft(root, shape) -> DraftTree -> accept(path, tokens)] per step

The interface (duck-typed; subclass :class:`Drafter` for the docstrings):

    start(input_ids [1, L], max_len)   a new sequence: the prompt; at most max_len tokens in all
    draft(root: int, shape) -> DraftTree
        root is the newest token (emitted by the target, in no KV cache yet); shape is a TreeSpec or a
        StaticTree; return at most shape.max_nodes drafted nodes (fewer, even none, is fine)
    accept(path: list[int], tokens: list[int][, payload: list[int]])
        path: the accepted node ids of the last DraftTree, root first; tokens: their tokens followed
        by the bonus token, which will be the next root; payload: only when the DraftTree carried a
        payload (DraftTree.payload), its values at the path's nodes, read in the acceptance's host read
    skip(root: int)   (optional) a step ran without drafting (autoregressive, chosen by the controller):
        root was committed by the target without a draft; catch up lazily (default: nothing to do)

An EAGLE head would keep the target's hidden states from verification (not passed here today) and
otherwise follow ModelDrafter: draft level by level, keep its own cache in step in accept().

Legend: V vocabulary, K top_k, D depth, F drafted nodes fed through the draft model in one step.
"""

from __future__ import annotations

import random
import time

import torch

from .buckets import VerifyRunner
from .checks import check_int
from .kv import Masks, TreeCache, forward, takes_cache_position
from .tree import DraftTree, StaticTree, TreeSpec

__all__ = ["Drafter", "ModelDrafter", "NgramDrafter", "OracleDrafter"]


class Drafter:
    """Base class documenting the drafter interface (see the module docstring)."""

    def start(self, input_ids: torch.Tensor, max_len: int) -> None:
        raise NotImplementedError

    def draft(self, root: int, shape: TreeSpec | StaticTree) -> DraftTree:
        raise NotImplementedError

    def accept(self, path: list[int], tokens: list[int]) -> None:
        raise NotImplementedError

    def skip(self, root: int) -> None:
        """A step without a draft committed root (the controller chose autoregressive decoding)."""


class ModelDrafter(Drafter):
    """A small causal LM sharing the target's vocabulary drafts the tree, one tree level per forward.

    Its KV cache is pre-allocated and kept in step with the accepted tokens: tree nodes it fed while
    drafting sit after its prefix; accept() moves the accepted ones into place (device-side index
    copies) and queues the rest (at most the path's last node, plus the bonus) for the next draft's
    first forward. Drafting is greedy on the draft's log-probabilities whatever the target samples
    with; sampling acceptance keeps the target's distribution exact regardless (accept.py).

    compile: run the draft model's forward through ``torch.compile`` (inductor, dynamic shapes: one graph serves
    every feed length; the first drafts compile, tens of seconds on a small CPU). False by default;
    ``SpeculativeDecoder(compile=True)`` turns it on when its target compiles through inductor. A compiled draft
    only changes what is proposed, never what is emitted (verification decides).
    cuda_graphs: on a CUDA device, each drafting pass size (the first feed of a step, each tree level) is captured
    once into a CUDA graph and replayed (buckets.VerifyRunner without a budget: static input buffers per size, the
    cache written in place); None (the default) turns it on for a compiled drafter on CUDA. The prompt's feed runs
    without a graph. Never on the CPU."""

    def __init__(self, model, vocab_size: int | None = None, compile: bool = False, cuda_graphs: bool | None = None):
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.cache: TreeCache | None = None
        self._cache_position = takes_cache_position(model)
        self._run_model = self.model
        self._fed_anc: torch.Tensor | None = None  # per-tree buffers (_begin_tree)
        self._runner = None  # the drafting passes' runner (CUDA graphs per pass size), made with the cache
        self._chains: dict = {}  # (depth, device) -> a chain's parents, depths, fed ids (_draft_chain)
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
            self._run_model = torch.compile(self.model, dynamic=True)
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
    def start(self, input_ids: torch.Tensor, max_len: int) -> None:
        if self.cache is None or self.cache.max_len < max_len:
            self.cache = TreeCache.for_model(self.model, max_len, self.device)
            self.masks = Masks(self.model, max_len)
            self._runner = None
        self.cache.length = 0
        self._feed_chain(input_ids[0].tolist(), graph=False)
        self._pending: list[int] = []

    @torch.no_grad()
    def draft(self, root: int, shape: TreeSpec | StaticTree) -> DraftTree:
        logits = self._feed_chain(self._pending + [root])  # commits the pending tokens and the root
        self._pending = []
        root_logp = torch.log_softmax(logits[-1].float(), -1)  # [V]
        root_t = torch.tensor([root], dtype=torch.long, device=self.device)
        if shape.max_nodes == 0:
            self._fed, self._num_fed = torch.full((1,), -1, dtype=torch.long, device=self.device), 0
            tree = DraftTree.root_only(root_t)
            tree.payload = self._fed
            return tree
        if isinstance(shape, TreeSpec) and shape.top_k == 1 and shape.total_tokens == shape.depth:
            return self._draft_chain(root_t, root_logp, shape.depth)
        if isinstance(shape, TreeSpec):
            return self._draft_dynamic(root_t, root_logp, shape)
        return self._draft_static(root_t, root_logp, shape)

    def accept(self, path: list[int], tokens: list[int], payload: list[int] | None = None) -> None:
        """payload: each path node's fed id (-1: never fed), as DraftTree.payload carried it; read here when not
        given (a caller driving the drafter by hand)."""
        if payload is None:
            payload = self._fed[torch.tensor(path, dtype=torch.long, device=self._fed.device)].tolist()
        used = [f for f in payload[1:] if f >= 0]
        if used:  # the fed nodes of the path are a prefix of it: every inner node was expanded
            if used != list(range(len(used))):  # else already in place (a chain, or a tree's first branch)
                order = torch.tensor(used + [f for f in range(self._num_fed) if f not in used], device=self.device)
                self.cache.compact(order, self.cache.length)
            self.cache.length += len(used)
        self._pending = tokens[1 + len(used) : -1]  # accepted but never fed (at most the last node)

    def skip(self, root: int) -> None:
        self._pending.append(root)  # fed, with the others, at the next draft's first forward

    # --- helpers -----------------------------------------------------------------------------------
    def _passes(self) -> VerifyRunner:
        """The drafting passes' runner, (re)made around the current forward and cache when either changed."""
        if self._runner is None:
            self._runner = VerifyRunner(self._run_model, self.cache, self.cuda_graphs, self._cache_position,
                                        budgeted=False)
        return self._runner

    def _feed_chain(self, tokens: list[int], graph: bool = True) -> torch.Tensor:
        """Commit tokens (causal, after the prefix) -> logits [len, V]. graph=False: never a CUDA graph (the
        prompt: one feed per request, of any length)."""
        n, start = len(tokens), self.cache.length
        dev = self.device
        pos = start + torch.arange(n, device=dev)
        mask = self.masks.causal(n, start, dev)
        tokens = torch.tensor(tokens, device=dev)
        if graph:
            logits = self._passes()(tokens, pos, mask, pos)
        else:
            logits = forward(self._run_model, self.cache, tokens, pos, mask, pos, self._cache_position)
        self.cache.length += n
        return logits[:, : self.vocab_size] if self.vocab_size else logits

    def _begin_tree(self, max_fed: int) -> None:
        """The fed nodes' ancestors [F, F] and positions [F]: buffers allocated once per F, cleared per tree."""
        dev = self.device
        self._num_fed = 0
        if self._fed_anc is None or self._fed_anc.shape[0] != max_fed or self._fed_anc.device != dev:
            self._fed_anc = torch.zeros(max_fed, max_fed, dtype=torch.bool, device=dev)  # [F, F]
            self._fed_pos = torch.zeros(max_fed, dtype=torch.long, device=dev)  # [F]
        else:
            self._fed_anc.zero_()
            self._fed_pos.zero_()

    def _feed_level(self, tokens: torch.Tensor, fed_parent: torch.Tensor, depth: int) -> torch.Tensor:
        """Feed one tree level: tokens [m] whose parents are fed nodes fed_parent [m] (-1: the root,
        which is committed) -> log-probs [m, V]. The level's nodes get fed ids num_fed .. +m-1."""
        dev = self.device
        m, prefix = tokens.shape[0], self.cache.length
        f = self._num_fed + torch.arange(m, device=dev)
        rows = self._fed_anc[fed_parent.clamp(min=0)] & (fed_parent >= 0)[:, None]  # [m, F]
        rows[torch.arange(m, device=dev), f] = True
        self._fed_anc[f] = rows
        pos = torch.full((m,), prefix - 1 + depth, dtype=torch.long, device=dev)  # the root sits at prefix-1
        self._fed_pos[f] = pos
        mask = self.masks.tree(rows, prefix, pos, self._fed_pos)
        logits = self._passes()(tokens, pos, mask, prefix + f)
        self._num_fed += m
        if self.vocab_size:
            logits = logits[:, : self.vocab_size]
        return torch.log_softmax(logits.float(), -1)

    def _draft_chain(self, root: torch.Tensor, root_logp: torch.Tensor, depth: int) -> DraftTree:
        """A chain (TreeSpec(K, K, 1)): each drafted token is the argmax after the one before, fed as a plain causal
        one-token step at the next slot (a chain's tree mask is the causal mask), so a level costs one forward and a
        few small ops. The same tree as _draft_dynamic with top_k=1 (ties: the lowest id)."""
        dev, prefix = self.device, self.cache.length
        lp, tok = root_logp.max(-1)  # 0-d each
        lps, toks = [lp], [tok]
        for f in range(depth - 1):  # drafted node f + 1 is fed at slot prefix + f, its position
            pos = torch.tensor([prefix + f], device=dev)
            logits = self._passes()(tok.reshape(1), pos, self.masks.causal(1, prefix + f, dev), pos)
            logits = logits[0, : self.vocab_size] if self.vocab_size else logits[0]
            lp, tok = torch.log_softmax(logits.float(), -1).max(-1)
            lps.append(lp)
            toks.append(tok)
        self._num_fed = depth - 1
        meta = self._chains.get((depth, dev))
        if meta is None:  # parents, depths and fed ids of a chain of this depth (root -1, last node never fed)
            fed = [-1, *range(depth - 1), -1]
            meta = self._chains[(depth, dev)] = (torch.arange(-1, depth, device=dev),
                                                 torch.arange(depth + 1, device=dev),
                                                 torch.tensor(fed, dtype=torch.long, device=dev))
        parents, depths, self._fed = meta
        logprob = torch.cat([root_logp.new_zeros(1), torch.stack(lps).cumsum(0)])
        return DraftTree(torch.cat([root, torch.stack(toks)]), parents, depths, logprob, payload=self._fed)

    def _draft_dynamic(self, root: torch.Tensor, root_logp: torch.Tensor, spec: TreeSpec) -> DraftTree:
        """EAGLE-2: expand the top_k children of the top_k best frontier nodes per level (scores are
        cumulative draft log-probs), then keep the total_tokens best candidates. Candidate ids (gid):
        0 is the root; a parent always has a lower gid than its children and a score >= theirs, so a
        stable sort by score keeps every kept node's parent."""
        k, dev = spec.top_k, self.device
        self._begin_tree(k * (spec.depth - 1))
        score, tok = root_logp.topk(k)  # [K]
        scores, toks, parents, depths, fed_of = [score], [tok], [torch.zeros(k, dtype=torch.long, device=dev)], [1], []
        front_gid = torch.arange(1, k + 1, device=dev)
        front_score, front_tok, front_fed_parent = score, tok, torch.full((k,), -1, device=dev)
        next_gid = k + 1
        for d in range(1, spec.depth):
            fed_ids = self._num_fed + torch.arange(k, device=dev)
            fed_of.append((front_gid, fed_ids))
            logp = self._feed_level(front_tok, front_fed_parent, d)  # [K, V]
            top_lp, top_tok = logp.topk(k, dim=-1)  # [K, K]
            child_score = (front_score[:, None] + top_lp).reshape(-1)  # [K*K]
            child_gid = next_gid + torch.arange(k * k, device=dev)
            scores.append(child_score)
            toks.append(top_tok.reshape(-1))
            parents.append(front_gid.repeat_interleave(k))
            depths.append(d + 1)
            best = torch.sort(child_score, descending=True, stable=True).indices[:k]
            front_gid, front_score, front_tok = child_gid[best], child_score[best], top_tok.reshape(-1)[best]
            front_fed_parent = fed_ids.repeat_interleave(k)[best]
            next_gid += k * k
        all_score = torch.cat(scores)  # [G-1], gids 1..G-1
        keep = torch.sort(all_score, descending=True, stable=True).indices[: spec.total_tokens]
        sel = torch.sort(keep).values + 1  # kept gids in gid order (parents first)
        all_tok = torch.cat([root, *toks])
        all_parent = torch.cat([torch.full((1,), -1, device=dev), *parents])
        all_depth = torch.cat([torch.zeros(1, dtype=torch.long, device=dev)]
                              + [torch.full((t.shape[0],), d, dtype=torch.long, device=dev)
                                 for t, d in zip(toks, depths)])
        gid = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), sel])  # local node -> gid
        local = torch.full((next_gid,), -1, dtype=torch.long, device=dev)
        local[gid] = torch.arange(gid.shape[0], device=dev)
        tree_parents = torch.where(all_parent[gid] >= 0, local[all_parent[gid].clamp(min=0)], -1)
        self._remember(gid, next_gid, fed_of)
        all_logprob = torch.cat([root_logp.new_zeros(1), all_score])
        return DraftTree(all_tok[gid], tree_parents, all_depth[gid], all_logprob[gid], payload=self._fed)

    def _draft_static(self, root: torch.Tensor, root_logp: torch.Tensor, shape: StaticTree) -> DraftTree:
        """Fixed tree: node (r_1, .., r_d) takes the r_d-th best token at its parent. Feed every
        level's inner nodes in one forward."""
        dev = self.device
        parents = shape.parents()  # host, root first
        n = len(parents)
        paths = ((),) + shape.paths
        inner = sorted({p for p in parents[1:]})
        self._begin_tree(max(len(inner) - 1, 1))
        tokens = torch.zeros(n, dtype=torch.long, device=dev)
        tokens[0] = root[0]
        logprob = torch.zeros(n, dtype=torch.float32, device=dev)  # cumulative draft log-prob of each path
        fed_id = {0: -1}
        logp_of = {0: root_logp[None]}  # node -> [1, V] log-probs (per level batch, row picked below)
        row_of = {0: 0}
        for d in range(1, shape.depth + 1):
            level = [i for i in range(1, n) if len(paths[i]) == d]
            need = max(paths[i][-1] for i in level) + 1
            for i in level:
                p = parents[i]
                top_lp, top = logp_of[p][row_of[p]].topk(need)
                tokens[i] = top[paths[i][-1]]
                logprob[i] = logprob[p] + top_lp[paths[i][-1]]
            feed = [i for i in level if i in inner]
            if feed:
                fp = torch.tensor([fed_id[parents[i]] for i in feed], device=dev)
                base = self._num_fed
                logp = self._feed_level(tokens[torch.tensor(feed, device=dev)], fp, d)
                for r, i in enumerate(feed):
                    fed_id[i], logp_of[i], row_of[i] = base + r, logp, r
        tree = DraftTree.from_lists([0] * n, parents, dev)
        self._fed = torch.tensor([fed_id.get(i, -1) for i in range(n)], dtype=torch.long, device=dev)
        tree.tokens, tree.logprob, tree.payload = tokens, logprob, self._fed
        return tree

    def _remember(self, gid: torch.Tensor, num_gids: int, fed_of) -> None:
        """Each tree node's fed id (-1: never fed), on the device: the tree's payload, read back with the
        acceptance and given to accept()."""
        gid_fed = torch.full((num_gids,), -1, dtype=torch.long, device=gid.device)
        for gids, fed in fed_of:
            gid_fed[gids] = fed
        self._fed = gid_fed[gid]


class NgramDrafter(Drafter):
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
        self.device = torch.device("cpu")

    def start(self, input_ids: torch.Tensor, max_len: int) -> None:
        self.device = input_ids.device
        self.history: list[int] = []
        self.index: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions just after it
        self._extend(input_ids[0].tolist())

    def _extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.history.append(t)
            end = len(self.history)
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self.index.setdefault(tuple(self.history[end - n :]), []).append(end)

    def _continuations(self, ctx: list[int], depth: int) -> list[list[int]]:
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(ctx) < n:
                continue
            key = tuple(ctx[-n:])
            ends = [e for e in self.index.get(key, []) if e < len(ctx)]
            if ends:
                return [ctx[e : e + depth] for e in reversed(ends[-self.max_matches :])]
        return []

    def draft(self, root: int, shape: TreeSpec | StaticTree) -> DraftTree:
        ctx = self.history + [root]
        depth, total = shape.depth, shape.max_nodes
        branch = shape.top_k if isinstance(shape, TreeSpec) else 1 + max((p[-1] for p in shape.paths), default=0)
        tokens, parents, children = [root], [-1], [{}]
        for cont in self._continuations(ctx, depth):
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
        return DraftTree.from_lists(tokens, parents, self.device)

    def accept(self, path: list[int], tokens: list[int]) -> None:
        self._extend(tokens[:-1])

    def skip(self, root: int) -> None:
        self._extend([root])


class OracleDrafter(Drafter):
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
        self.device = torch.device("cpu")
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

    def start(self, input_ids: torch.Tensor, max_len: int) -> None:
        self.device = input_ids.device
        self.history = input_ids[0].tolist()
        self.ref = self._refs.get(tuple(self.history), self.history)
        self.rng = random.Random(self.seed)

    def _reference(self, ctx: list[int], depth: int) -> list[int]:
        """The reference tokens after ctx (depth of them), recomputed where ctx left the reference."""
        n = len(ctx)
        if self.ref[:n] != ctx or len(self.ref) <= n:  # left the reference, or at its end: extend from here
            self.ref = self.greedy(ctx, max(self.horizon, depth))
        return self.ref[n : n + depth]  # near a precomputed end: a shorter chain

    def _wrong(self, right: int, vocab: int) -> int:
        return (right + 1 + self.rng.randrange(vocab - 1)) % vocab

    def draft(self, root: int, shape: TreeSpec | StaticTree) -> DraftTree:
        ctx = self.history + [root]
        total, depth = shape.max_nodes, min(shape.depth, shape.max_nodes)
        if total == 0 or depth == 0:
            return DraftTree.from_lists([root], [-1], self.device)
        vocab = self.vocab_size or self.target.config.get_text_config(decoder=True).vocab_size
        right = self._reference(ctx, depth)
        chain = [t if self.rng.random() < self.acceptance else self._wrong(t, vocab) for t in right]
        tokens, parents = [root] + chain, [-1] + list(range(len(chain)))
        d = 0
        while len(tokens) - 1 < total and d < 16 * total:  # fill: wrong siblings of the chain's nodes
            node = 1 + d % len(chain)
            taken = {tokens[i] for i in range(1, len(tokens)) if parents[i] == parents[node]}
            t = self._wrong(right[node - 1], vocab)
            if t not in taken:
                tokens.append(t)
                parents.append(parents[node])
            d += 1
        return DraftTree.from_lists(tokens, parents, self.device)

    def accept(self, path: list[int], tokens: list[int]) -> None:
        self.history.extend(tokens[:-1])

    def skip(self, root: int) -> None:
        self.history.append(root)
