"""Batched speculative decoding: every row drafts its own tree, one verify pass takes all live rows' trees,
each row accepts its own path and advances by its own length; rows stop on their own.

prompts [B, L] (left padded) --prefill (exact)--> roots [R]; loop: pack live rows into a rows bucket R ->
draft a tree per row -> pad the trees to a tree bucket N -> one verify pass of R x N tokens (budget over the
batch) -> accept per row -> compact both KV caches per row on the device -> next roots

Legend: B rows asked for, R rows of a pass (a rows bucket: live rows + dead padding rows), L prompt length,
n nodes of the widest tree (root included), N padded nodes per row, S cache slots, V vocabulary, T = R * N.

Budgets over the batch. The experts a MoE layer loads in a verify pass are shared by every row of the pass,
so the budget set A of a layer is chosen once per pass from all live rows' real tokens: s_e sums the
router's probabilities over the live rows' tree nodes, and A is the C best experts (budget.py, DESIGN.md).
Padding nodes of a narrower row's tree, and every token of a dead (finished) or padding row, get weight 0
through ``msc.token_weights`` (a [T] vector over the pass's flattened tokens, row-major): they do not vote,
and under the "substitute" policy they are routed inside A like every other token, so no pass loads more
than C experts per layer. A per-row budget set (each row choosing its own A_b) is not offered: the routing
op scores experts over the whole pass ([E] scores, one rank), and per-row sets would need [R, E] scores and
a row index per token inside moespec::budget_topk; it would also load the union of the rows' sets, up to
R * C experts, which is not the budget C a user asked for.

Rows that finish (EOS or max_new_tokens) stop voting at once and leave the pass when the live rows fit a
smaller rows bucket: both caches are packed on the device (index_select over rows), the per-bucket target
cache keeps its buffers so CUDA graphs captured for it stay valid. Until then a dead row's nodes (like the
padding nodes of a narrower tree) mirror its root: same token, position and view, so under exact routing
they pick the root's experts and a dead row adds at most k experts per layer to the pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..budget import MAX_TOKENS, token_weights
from ..budget import budget as budget_ctx
from ..record import record_experts
from .accept import SamplingConfig, process_logits
from .batch_accept import accept_greedy_batch, accept_sample_batch
from .batch_drafters import BatchTree, batch_drafter_for, pad_tree
from .batch_kv import BatchCache, BatchMasks, batch_ancestors, batch_forward
from .buckets import _clone_mask, _copy_mask, capture_graph, pick_bucket
from .decoder import GenerateOutput, _allow_recompiles  # decoder imports this module lazily (no cycle)
from .tree import StaticTree, TreeSpec

__all__ = ["DEFAULT_ROW_BUCKETS", "BatchGenerateStats", "BatchVerifyStats", "BatchVerifyRunner", "BatchedGenerator",
           "check_batch"]

DEFAULT_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class BatchVerifyStats:
    rows: int  # live rows verified in this pass
    row_bucket: int  # R: rows the pass ran (live rows + padding rows)
    tree_size: int  # nodes of the widest row's tree, root included
    bucket: int  # N: padded nodes per row
    tokens: int  # real tokens (live rows' tree nodes): the tokens that vote in the budget
    budget: object  # the budget this pass ran under (None: exact)
    accepted: int = 0  # tokens all rows emitted in this pass (accepted drafts + bonus)
    experts_per_layer: dict[str, int] | None = None  # distinct experts per MoE block (None: not recorded)
    budget_bound: bool | None = None  # some block used all C experts it was allowed


@dataclass
class RowStats:
    steps: int = 0  # verify passes this row took part in
    new_tokens: int = 0
    accepted_per_step: list[int] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> float:
        return sum(self.accepted_per_step) / max(len(self.accepted_per_step), 1)


@dataclass
class BatchGenerateStats:
    """Overall figures of a batched generate, with ``rows[b]`` per row (steps, tokens, tokens per step)."""

    rows: list[RowStats] = field(default_factory=list)
    verify: list[BatchVerifyStats] = field(default_factory=list)
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_accept: float = 0.0

    @property
    def steps(self) -> int:
        """Verify passes (each covers every live row)."""
        return len(self.verify)

    @property
    def new_tokens(self) -> int:
        return sum(r.new_tokens for r in self.rows)

    @property
    def tokens_per_step(self) -> float:
        """Mean accepted length per row and pass (bonus included)."""
        steps = sum(r.steps for r in self.rows)
        return sum(sum(r.accepted_per_step) for r in self.rows) / max(steps, 1)

    @property
    def time_total(self) -> float:
        return self.time_prefill + self.time_draft + self.time_verify + self.time_accept

    def experts_per_layer(self) -> float | None:
        """Mean distinct experts per MoE layer per verify pass (None: not recorded)."""
        counts = [n for v in self.verify if v.experts_per_layer for n in v.experts_per_layer.values()]
        return sum(counts) / len(counts) if counts else None

    def experts_per_token(self) -> float | None:
        """Distinct experts per MoE layer loaded per emitted token (the verify passes' expert traffic)."""
        loads = [sum(v.experts_per_layer.values()) / len(v.experts_per_layer) for v in self.verify
                 if v.experts_per_layer]
        emitted = sum(v.accepted for v in self.verify if v.experts_per_layer)
        return sum(loads) / emitted if loads and emitted else None

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """(rows bucket R, tree bucket N) of the passes run."""
        return sorted({(v.row_bucket, v.bucket) for v in self.verify})

    def summary(self) -> dict:
        total = self.time_total
        experts, per_token = self.experts_per_layer(), self.experts_per_token()
        bound = [v.budget_bound for v in self.verify if v.budget_bound is not None]
        return {
            "rows": len(self.rows),
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "tokens_per_step": round(self.tokens_per_step, 3),
            "tokens_per_s": round(self.new_tokens / total, 2) if total > 0 else None,
            "experts_per_layer": None if experts is None else round(experts, 2),
            "experts_per_token": None if per_token is None else round(per_token, 3),
            "budget_bound_fraction": round(sum(bound) / len(bound), 3) if bound else None,
            "buckets": self.buckets,
            "per_row": [{"new_tokens": r.new_tokens, "steps": r.steps, "tokens_per_step": round(r.tokens_per_step, 3)}
                        for r in self.rows],
            "time_s": {name: float(f"{value:.4g}") for name, value in (
                ("prefill", self.time_prefill), ("draft", self.time_draft), ("verify", self.time_verify),
                ("accept", self.time_accept), ("total", total))},
        }


    def __str__(self) -> str:
        s = self.summary()
        t = s["time_s"]
        rows = [
            ("rows", f"{s['rows']}: {s['new_tokens']} new tokens in {s['steps']} verify passes"),
            ("tokens per pass", f"{s['tokens_per_step']:.2f} per row (accepted drafts + 1 bonus)"),
            ("tokens/s", "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f} (prefill included)"),
            ("experts/layer", "not recorded" if s["experts_per_layer"] is None
             else f"{s['experts_per_layer']:.1f} per verify pass, {s['experts_per_token']:.2f} per emitted token"),
            ("time (s)", "  ".join(f"{k} {v:.3g}" for k, v in t.items())),
            ("buckets", ", ".join(f"{r} rows x {n} tokens" for r, n in s["buckets"]) or "-"),
        ]
        return "\n".join(f"{name:<16} {value}" for name, value in rows)


def check_batch(input_ids: torch.Tensor, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L], mask [B, L] int64) or ValueError: the mask must match input_ids' shape, hold 0/1 only,
    pad on the left (every row's zeros before its ones) and leave every row at least one real token."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(f"input_ids must be [B, L] with B, L >= 1, got shape {tuple(ids.shape)}")
    if attention_mask is None:
        return ids, torch.ones_like(ids, dtype=torch.long)
    mask = torch.as_tensor(attention_mask, device=ids.device)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(ids.shape)}, got {tuple(mask.shape)}")
    mask = mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (tokens) only")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask has right padding (a 0 after a 1 in some row); SpeculativeDecoder "
                         "needs left padding, as transformers' generate does for decoder-only models "
                         "(tokenizer.padding_side = 'left')")
    if bool((mask.sum(1) == 0).any()):
        raise ValueError("attention_mask leaves a row without any token")
    return ids, mask


class BatchVerifyRunner:
    """Runs a batched verify pass [R, N] of a target under a budget; on CUDA one captured graph per
    (rows bucket R, tree bucket N).

    The budget and the per-token weights are device data (``msc.budget`` and ``msc.token_weights`` rewrite
    tables in place around every pass, captured graphs read them at replay), so neither is part of the key.
    The policy is a host-side choice baked into a captured graph: it is fixed per runner. Each rows bucket
    has its own cache (BatchedGenerator keeps them), so the graph of (R, N) always reads the same buffers.
    Only the eager path has run in this project's tests; the capture follows buckets.VerifyRunner, written
    to torch.cuda.CUDAGraph's rules but not run on a GPU here."""

    def __init__(self, model, use_graphs: bool, cache_position: bool = False, policy: str = "substitute"):
        self.model, self.use_graphs, self.cache_position, self.policy = model, use_graphs, cache_position, policy
        self.static: dict[tuple[int, int], dict] = {}
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.captures = 0

    def __call__(self, cache: BatchCache, tokens, positions, mask, slots, weights, c) -> torch.Tensor:
        """tokens, positions, slots [R, N]; mask [R, 1, N, S] (or a dict); weights [R * N] -> logits [R, N, V]."""
        if not self.use_graphs:
            with budget_ctx(c, policy=self.policy, max_budget_tokens=None), token_weights(weights):
                return batch_forward(self.model, cache, tokens, positions, mask, slots, self.cache_position)
        key = tuple(tokens.shape)
        buf = self.static.get(key)
        if buf is None:
            buf = self.static[key] = {"tokens": tokens.clone(), "positions": positions.clone(), "slots": slots.clone(),
                                      "weights": weights.clone(), "mask": _clone_mask(mask)}
        for name, value in (("tokens", tokens), ("positions", positions), ("slots", slots), ("weights", weights)):
            buf[name].copy_(value)
        _copy_mask(buf["mask"], mask)
        cache.slots = buf["slots"]  # batch_forward copies slots onto itself: the graph reads this address
        with budget_ctx(c, policy=self.policy, max_budget_tokens=None), token_weights(buf["weights"]):
            if key not in self.graphs:
                self.graphs[key] = self._capture(cache, buf)
            graph, logits = self.graphs[key]
            graph.replay()
        return logits

    def _run(self, cache, buf):
        return batch_forward(self.model, cache, buf["tokens"], buf["positions"], buf["mask"], buf["slots"],
                             self.cache_position)

    def _capture(self, cache, buf):
        """Warm up on a side stream (compiles, allocates workspaces), then capture one forward."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        self.captures += 1
        return capture_graph(lambda: self._run(cache, buf), self.pool)

    def reset(self) -> None:
        self.static.clear()
        self.graphs.clear()


class BatchedGenerator:
    """The batched loop behind ``SpeculativeDecoder.generate`` when input_ids has several rows.

    It reads the decoder's settings (target, verify model, drafter, policy, buckets, CUDA graphs, expert
    recording) and keeps one target cache per rows bucket plus the verify runner across calls."""

    def __init__(self, dec, row_buckets=DEFAULT_ROW_BUCKETS):
        self.dec = dec
        self.row_buckets = tuple(row_buckets)
        self.device = dec.device
        self.caches: dict[int, BatchCache] = {}
        self.max_len = 0
        self.runner = BatchVerifyRunner(dec.verify_model, dec.cuda_graphs, dec._cache_position, dec.policy)
        self.drafter = None
        _allow_recompiles(len(self.row_buckets) * len(dec.tree_buckets) + 8)  # one graph per (R, N) when compiled

    # --- the loop ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens: int, sampling: SamplingConfig, shape, schedule,
                 eos: set[int], pad_token_id: int | None, generator=None):
        ids, mask = check_batch(input_ids, attention_mask)
        ids, mask = ids.to(self.device), mask.to(self.device)
        _allow_recompiles(len(self.row_buckets) * len(self.dec.tree_buckets) + 8)  # the decoder may fit new sizes
        b, length = ids.shape
        r = pick_bucket(b, self.row_buckets)
        rows_ids = torch.cat([ids, ids[:1].expand(r - b, length)])  # padding rows repeat row 0
        pad = length - torch.cat([mask, mask[:1].expand(r - b, length)]).sum(1)
        self._allocate(length + max_new_tokens, shape)
        stats = BatchGenerateStats(rows=[RowStats() for _ in range(b)])
        self.row_of = list(range(b)) + [-1] * (r - b)  # cache row -> batch row (-1: padding or finished)
        self.new: list[list[int]] = [[] for _ in range(b)]
        self.eos, self.max_new = eos, max_new_tokens

        t = self._clock()
        first = self.prefill(rows_ids, pad, sampling, generator)
        self.cache = self.caches[r]
        drafting = shape.max_nodes > 0
        if drafting:
            self.drafter = batch_drafter_for(self.dec.drafter)
            if getattr(self.drafter, "vocab_size", 0) is None:
                self.drafter.vocab_size = self.dec.vocab_size
            self.drafter.start(rows_ids, pad, self.max_len)
        self._emit(first.tolist())
        self.roots = first
        stats.time_prefill = self._clock() - t
        while any(self.live_host):
            self._pack(drafting)
            c = schedule(len(stats.verify)) if callable(schedule) else schedule
            self._step(shape, c, sampling, generator, drafting, stats)
        sequences = self._sequences(ids, pad_token_id)
        for rs, toks in zip(stats.rows, self.new):
            rs.new_tokens = len(toks)
        return GenerateOutput(sequences, stats)

    def _step(self, shape, c, sampling, generator, drafting: bool, stats: BatchGenerateStats) -> None:
        """draft -> verify -> accept for every live row."""
        live = torch.tensor(self.live_host, device=self.device)
        t0 = self._clock()
        tree = self.drafter.draft(self.roots, shape, live) if drafting else _root_only(self.roots)
        t1 = self._clock()
        logits, anc, tree, vstat = self.verify(tree, live, c, shape)
        t2 = self._clock()
        if sampling.do_sample:
            acc = accept_sample_batch(tree, logits, sampling, live, generator)
        else:
            acc = accept_greedy_batch(tree, logits, anc, live)
        self.cache.compact(acc.order, self.cache.lengths)
        self.cache.lengths += acc.length
        if drafting:
            self.drafter.accept(acc, live)
        self.roots = torch.tensor(acc.bonus, dtype=torch.long, device=self.device)
        for i, alive in enumerate(self.live_host):
            if alive:
                rs = stats.rows[self.row_of[i]]
                rs.steps += 1
                rs.accepted_per_step.append(len(acc.tokens[i]))
                vstat.accepted += len(acc.tokens[i])
        self.len_host = [n + len(t) for n, t in zip(self.len_host, acc.tokens)]
        self._emit(acc.bonus, acc.tokens)
        t3 = self._clock()
        stats.verify.append(vstat)
        stats.time_draft += t1 - t0
        stats.time_verify += t2 - t1
        stats.time_accept += t3 - t2

    def prefill(self, rows_ids: torch.Tensor, pad: torch.Tensor, sampling: SamplingConfig, generator=None):
        """Exact (never budgeted) forward of the left-padded prompts through the uncompiled target -> the
        first token of every row [R]."""
        r, length = rows_ids.shape
        dec, cache = self.dec, self._cache_for(r)
        cache.pad.copy_(pad)
        slots = torch.arange(length, device=self.device).expand(r, length)
        pos = (slots - pad[:, None]).clamp(min=0)
        with budget_ctx(None):
            logits = batch_forward(dec.eager_target, cache, rows_ids, pos, self.masks.prompt(pad, length), slots,
                                   dec._cache_position)[:, -1, : dec.vocab_size]
        cache.lengths.fill_(length)
        self.len_host = [length] * r
        self.live_host = [row >= 0 for row in self.row_of]
        if not sampling.do_sample:
            return logits.argmax(-1)
        probs = process_logits(logits, sampling)
        return torch.multinomial(probs.cpu() if generator is not None else probs, 1, generator=generator)[:, 0] \
            .to(self.device)

    def verify(self, tree: BatchTree, live: torch.Tensor, c, shape):
        """One forward of every row's padded tree under budget c -> (logits [R, N, V], anc, padded tree, stats).

        Row b's nodes sit after its prefix (slots length_b ..), at positions length_b - pad_b + depth; a padding
        node, and every node of a dead row, sees what the root sees (pad_tree): under exact routing it adds no
        experts beyond its row's root's. Weights for the budget's expert scores: 1 for a live row's real node, 0
        for padding nodes and for dead and padding rows."""
        cache, dev = self.cache, self.device
        r, n = tree.tokens.shape
        big_n = pick_bucket(n, self.dec.tree_buckets)
        if r * big_n > MAX_TOKENS:
            raise ValueError(f"a verify pass of {r} rows x {big_n} tree tokens exceeds the {MAX_TOKENS} tokens "
                             "msc.token_weights covers; use fewer rows or a smaller tree")
        if max(self.len_host) + big_n > self.max_len:
            raise RuntimeError(f"KV cache of {self.max_len} slots is full ({max(self.len_host)} + {big_n})")
        tree = pad_tree(tree, big_n)
        valid = tree.valid & live[:, None]  # a dead row's nodes all mirror its root too: at most k experts
        tree = BatchTree(torch.where(valid, tree.tokens, tree.tokens[:, :1]), tree.parents,
                         torch.where(valid, tree.depth, 0), valid)
        anc = batch_ancestors(tree.parents, max(shape.depth, 1))
        anc = torch.where(valid[..., None], anc, torch.arange(big_n, device=dev) == 0)  # padding: as the root
        pos = (cache.lengths - cache.pad)[:, None] + tree.depth
        mask = self.masks.tree(anc, cache.lengths, cache.pad, pos, pos)
        slots = cache.lengths[:, None] + torch.arange(big_n, device=dev)
        weights = valid.float().reshape(-1)
        stat = BatchVerifyStats(rows=sum(self.live_host), row_bucket=r, tree_size=n, bucket=big_n,
                                tokens=int(weights.sum()), budget=c)
        if self.dec.records_experts():
            with record_experts() as rec:
                logits = self.runner(cache, tree.tokens, pos, mask, slots, weights, c)
            if rec.events:
                stat.experts_per_layer = {ev.block: len(ev.experts) for ev in rec.events}
                stat.budget_bound = any(ev.budget is not None and len(ev.experts) >= ev.budget for ev in rec.events)
        else:
            logits = self.runner(cache, tree.tokens, pos, mask, slots, weights, c)
        return logits[..., : self.dec.vocab_size], anc, tree, stat

    # --- rows: emitted tokens, finishing, packing -----------------------------------------------------
    def _emit(self, bonus: list[int], paths: list[list[int]] | None = None) -> None:
        """Append each live row's accepted drafted tokens and bonus; a row finishes at EOS or max_new_tokens."""
        for i, row in enumerate(self.row_of):
            if not self.live_host[i]:
                continue
            out = self.new[row]
            for tok in (paths[i][1:] if paths else []) + [bonus[i]]:
                out.append(tok)
                if tok in self.eos or len(out) >= self.max_new:
                    self.live_host[i] = False
                    break

    def _pack(self, drafting: bool) -> None:
        """Move the live rows into the smallest rows bucket that holds them (device copies, no host loop over
        the cache); the bucket's spare rows repeat a live row and stay dead."""
        live = [i for i, alive in enumerate(self.live_host) if alive]
        r = pick_bucket(len(live), self.row_buckets)
        if r >= len(self.row_of):
            return
        keep = live + [live[0]] * (r - len(live))
        rows = torch.tensor(keep, device=self.device)
        target = self._cache_for(r)
        target.copy_rows(self.cache, rows)
        self.cache = target
        if drafting:
            self.drafter.select(rows)
        self.roots = self.roots.index_select(0, rows)
        self.row_of = [self.row_of[i] for i in live] + [-1] * (r - len(live))
        self.live_host = [True] * len(live) + [False] * (r - len(live))
        self.len_host = [self.len_host[i] for i in keep]

    def _sequences(self, ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
        """[B, L + longest row's new tokens]: prompts as given, new tokens, then the pad token (transformers'
        layout; a row that stopped at EOS is padded after it)."""
        self.new = [t[: max(self.max_new, 0)] for t in self.new]  # max_new_tokens=0: nothing, as at batch 1
        width = max(len(t) for t in self.new)
        if pad_token_id is None and any(len(t) < width for t in self.new):
            raise ValueError("rows finished at different lengths and there is no pad token: pass pad_token_id "
                             "(or set generation_config.pad_token_id or eos_token_id)")
        out = torch.full((ids.shape[0], width), pad_token_id if pad_token_id is not None else 0, dtype=ids.dtype)
        for b, toks in enumerate(self.new):
            out[b, : len(toks)] = torch.tensor(toks, dtype=ids.dtype)
        return torch.cat([ids, out.to(ids.device)], dim=1)

    # --- allocation ---------------------------------------------------------------------------------
    def _allocate(self, seq_len: int, shape) -> None:
        """Caches of max_len slots: the sequence, a verify pass past an overshooting path, the drafter's fed
        nodes. Reallocated (and captured graphs dropped) only when a longer sequence comes."""
        nodes = pick_bucket(shape.max_nodes + 1, self.dec.tree_buckets)
        need = seq_len + 2 * nodes + shape.depth + 4
        if isinstance(shape, TreeSpec):
            need += shape.top_k * max(shape.depth - 1, 0)
        elif isinstance(shape, StaticTree):
            need += nodes
        if need > self.max_len:
            self.max_len = -(-need // 64) * 64
            self.caches.clear()
            self.runner.reset()
            self.masks = BatchMasks(self.dec.eager_target, self.max_len)

    def _cache_for(self, r: int) -> BatchCache:
        if r not in self.caches:
            self.caches[r] = BatchCache.for_model(self.dec.eager_target, r, self.max_len, self.device)
        return self.caches[r]

    def _clock(self) -> float:
        if self.dec.timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _root_only(roots: torch.Tensor) -> BatchTree:
    r, dev = roots.shape[0], roots.device
    zero = torch.zeros(r, 1, dtype=torch.long, device=dev)
    return BatchTree(roots[:, None].clone(), zero - 1, zero, torch.ones(r, 1, dtype=torch.bool, device=dev))
