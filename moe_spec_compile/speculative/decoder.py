"""The speculative decoding loop, one for every batch size: prefill, then draft -> verify -> accept until done.

prompts [B, L] (left padded) --prefill (exact)--> roots [R]; loop: pack live rows into a rows bucket R -> draft a
tree per row -> pad the trees to a tree bucket N -> one verify pass of R x N tokens (tree masks, exactly budget C
over the pass, node weights; padding weighs 0) -> accept a path + bonus per row -> compact the KV caches -> next roots

Legend: B rows asked for, R rows of a pass (a rows bucket: live rows + dead padding rows; 1 for one sequence),
L prompt length, n nodes of the widest tree (root included), N padded nodes per row, S cache slots, V vocabulary.

Budgets over the batch. The experts a MoE layer loads in a verify pass are shared by every row of the pass, so the
budget set A of a layer is chosen once per pass from all live rows' real tokens (budget.py, DESIGN.md); padding
nodes of a narrower row's tree, and every token of a dead (finished) or padding row, weigh 0 through
``msc.token_weights``: they do not vote, and under the "substitute" policy they are routed inside A like every other
token, so no pass loads more than C experts per layer. A per-row budget set is not offered: it would load the union
of the rows' sets, up to R * C experts, which is not the budget C a user asked for.

Rows that finish (EOS or max_new_tokens) stop voting at once and leave the pass when the live rows fit a smaller rows
bucket: the caches are packed on the device (kv.TreeCache.copy_rows); each rows bucket keeps its own cache, so CUDA
graphs captured for it stay valid. Until then a dead row's nodes (like the padding nodes of a narrower tree) mirror
its root: same token, position and view, so under exact routing they add at most k experts per layer to the pass.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from functools import partial

import torch

from ..backend import allow_recompiles, is_moespec_compiled, moespec_options
from ..budget import MAX_TOKENS, pass_counts, tables, validate_budget, validate_policy
from ..budget import budget as budget_ctx
from .accept import SamplingConfig, accept_greedy, accept_sample, process_logits
from .buckets import DEFAULT_TREE_BUCKETS, FastestExact, VerifyRunner, compile_pass, pick_bucket
from .checks import (
    check_batch,
    check_compile_options,
    check_input_ids,
    check_int,
    check_tree_fits_vocab,
    passive_omp_threads,
    warn_slow_cpu_environment,
)
from .controller import make_controller
from .drafters import Drafter, ModelDrafter, NgramDrafter
from .kv import Masks, TreeCache, forward, takes_cache_position
from .ranks import RankGroup
from .stats import GenerateStats, RowStats, VerifyStats
from .tree import DraftTree, StaticTree, TreeSpec, ancestors, as_tree_shape
from .weights import DEFAULT_NODE_WEIGHTS, node_weights, validate_node_weights

__all__ = ["SpeculativeDecoder", "GenerateOutput", "DEFAULT_ROW_BUCKETS"]

_UNSET = object()
DEFAULT_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, L + new tokens]
    stats: GenerateStats


class SpeculativeDecoder:
    """Speculative decoding of a (MoE) target with a drafter, verifying draft trees under an expert budget.

        dec = SpeculativeDecoder(target, drafter=ModelDrafter(draft), tree=TreeSpec(32, 5, 4), budget=16)
        out = dec.generate(input_ids, max_new_tokens=128)        # out.sequences, out.stats

    target: a transformers causal LM, plain or already ``torch.compile``-d; ``compile=True`` compiles it
    here with backend="moespec" (``compile_options`` go to the backend, e.g. ``{"inner": "eager"}``; through
    inductor, the default, a ModelDrafter's forward is compiled too; none of these guard on module attributes, so a
    model changed afterwards needs a new decoder: buckets.compile_pass), one graph per tree-size bucket (dynamo's
    recompile limit is raised to fit the buckets; a target compiled by the caller needs the same,
    ``torch._dynamo.config.recompile_limit``).
    Budgets only bind inside a moespec-compiled target: a budget for any other target (compile=False) is
    refused with a ValueError. drafter: ModelDrafter, NgramDrafter or anything
    with the Drafter interface (default NgramDrafter()). tree: int K (a chain), TreeSpec, or a list of
    paths. budget: None (exact), an int C, or a callable ``step -> C`` (a schedule). Every
    verify pass runs under exactly that C (``msc.budget(C, policy=policy)`` around it: budgets are device
    data, so one graph per tree-size bucket serves every budget; C is never rounded up). The prefill is
    always exact. policy: "substitute" | "truncate". Budget, policy and max_budget_tokens are the decoder's
    own: passing them in ``compile_options`` raises a ValueError.
    node_weights: how much each tree node's token counts when the budget picks its experts: "depth" (0.5 **
    depth; the default, measured best: benchmarks/results/node_weights_cpu.md), "path" (the drafter's path
    probability; "uniform" for drafters without probabilities, e.g. NgramDrafter) or "uniform"; padding rows
    always weigh 0 (speculative/weights.py).
    budget_buckets: deprecated and ignored (a DeprecationWarning): budgets are no longer rounded to buckets.
    tree="auto" / budget="auto": a controller (controller.py) picks the tree shape, including no speculation,
    and the budget per step by Cascade's utility, with the cost model as prior; budget="auto" picks among
    exact and min_budget, 2*min_budget, ... (without min_budget it stays exact); controller= a Controller to
    use instead (its trees and budgets); out.stats.decisions holds the trace.
    tree_buckets: the pass sizes trees are padded to (default: 1, 2, 4, 8, 16, 24, ... plus the full size of every
    tree shape the decoder runs, so a chain of K verifies K + 1 tokens; fit_pass_size).
    cuda_graphs: capture each pass shape's (rows bucket, tree bucket) verify pass once (default: on CUDA).
    collect_expert_stats: record experts per layer per verify pass (reads ids back to the host). None (default):
    record the passes that run in the moespec graph anyway (budgeted ones, exact ones where that path is the
    faster), never moving a pass off its faster path, and never while replaying graphs (Python does not run
    there; msc.expert_stats() reads device counters); True: every exact pass of N > 1 stays in the moespec graph,
    which counts it (slower where the plain graph is faster); False: nothing recorded.
    Batches: generate(input_ids [B, L], attention_mask) with left padding; every row drafts its own tree and one
    verify pass of R rows x N nodes takes them all (R a rows bucket); batch 1 is the same code with B = 1.
    Exact passes (no budget) run on the fastest exact path, measured per pass shape on this device
    (buckets.FastestExact; each pass's ``path`` in out.stats says which): the moespec graph, the plain target and,
    for a model whose experts dispatch transformers' grouped_mm, the plain target with its "batched_mm" experts.
    The plain target is the unmodified model compiled by inductor where the moespec graph's inner compiler is
    inductor and no CUDA graph is replayed (then every pass size, except where collect_expert_stats=True keeps
    passes of N > 1 in the moespec graph), else the eager model (one-token passes, no batched_mm path).
    """

    def __init__(self, target, drafter: Drafter | None = None, tree=4, budget=None, policy: str = "substitute",
                 compile: bool = False, compile_options: dict | None = None, tree_buckets=None,
                 budget_buckets=_UNSET, cuda_graphs: bool | None = None,
                 collect_expert_stats: bool | None = None, timing: bool = True,
                 node_weights: str = DEFAULT_NODE_WEIGHTS, min_budget: int | None = None, controller=None):
        self.target = target
        self.eager_target = getattr(target, "_orig_mod", target)  # prefill runs here: exact, any length
        self.verify_model = target
        compile_options = check_compile_options(compile_options)
        if budget_buckets is not _UNSET:
            warnings.warn("SpeculativeDecoder(budget_buckets=...) is deprecated and ignored: budgets are device "
                          "data, so every verify pass runs under exactly the budget asked for (never rounded "
                          "up) with one graph per tree-size bucket", DeprecationWarning, stacklevel=2)
        self.node_weights = validate_node_weights(node_weights)
        if compile:
            options = {"policy": validate_policy(policy), "max_budget_tokens": None, **compile_options}
            self.verify_model = compile_pass(self.eager_target, "moespec", options=options)
        self.drafter = drafter if drafter is not None else NgramDrafter()
        if compile and compile_options.get("inner", "inductor") == "inductor" and isinstance(self.drafter,
                                                                                           ModelDrafter):
            self.drafter.compile()  # the draft's forward through inductor too (drafters.ModelDrafter)
        self._tree_arg, self._budget_arg = tree, budget
        self.controller = make_controller(tree, budget, min_budget, controller, self.eager_target)
        self.tree = as_tree_shape(0 if tree == "auto" else tree)
        self.budget = None if budget == "auto" else _check_budget(budget)
        if self.controller is not None and any(c is not None for _, c in self.controller.configs):
            _refuse_unbound(min_budget, compile or is_moespec_compiled(target))
        self._budgets_bind = compile or is_moespec_compiled(target)
        _refuse_unbound(self.budget, self._budgets_bind)
        self.policy = validate_policy(policy)
        self._fit_sizes = tree_buckets is None  # default: the power-of-two-ish sizes plus each shape's own size
        self.tree_buckets = tuple(sorted(set(DEFAULT_TREE_BUCKETS if tree_buckets is None else tree_buckets)))
        self.device = next(self.eager_target.parameters()).device
        self.ranks = RankGroup.of(self.eager_target)  # under torchrun, a sharded target's ranks decode in lockstep
        warn_slow_cpu_environment(self.device)
        # an offloaded target loads experts inside its passes (a host read of the routing): no capture
        offloaded = getattr(self.eager_target, "_moespec_offload_handle", None) is not None
        if cuda_graphs and offloaded:
            raise ValueError("cuda_graphs=True cannot capture a target whose experts are offloaded (its passes load "
                             "missing experts as they run); leave cuda_graphs=None")
        self.cuda_graphs = self.device.type == "cuda" and not offloaded if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the target on a CUDA device")
        if collect_expert_stats not in (None, True, False):
            raise ValueError(f"collect_expert_stats must be None, True or False, got {collect_expert_stats!r}")
        self.collect_expert_stats = collect_expert_stats
        # Exact passes of every size may run on the plain target compiled by inductor (FastestExact, measured per
        # pass size) when the moespec graph itself is compiled by inductor and no CUDA graph is replayed; expert
        # statistics are counted in the moespec graph, so collect_expert_stats=True keeps passes of N > 1 there.
        options = compile_options if compile else moespec_options(target)
        self._exact_any_n = (options is not None and options.get("inner", "inductor") == "inductor"
                             and not self.cuda_graphs and self.verify_model is not self.eager_target)
        self.plain_target = plain_compiled(self.verify_model) if self._exact_any_n else self.eager_target
        self.timing = timing
        # the train/eval mode the passes this decoder compiled keep (buckets.compile_pass); None: it compiled none
        self._training = self.eager_target.training if compile or self._exact_any_n else None
        self.vocab_size = self.eager_target.config.get_text_config(decoder=True).vocab_size
        self.tree = self._tree_shape(0 if tree == "auto" else tree)
        for shape, _ in self.controller.configs if self.controller is not None else ():
            self.fit_pass_size(shape)  # every shape the controller may pick runs at its own size
        if hasattr(self.drafter, "vocab_size") and self.drafter.vocab_size is None:
            self.drafter.vocab_size = self.vocab_size
        self._cache_position = takes_cache_position(self.eager_target)
        self.row_buckets = DEFAULT_ROW_BUCKETS
        self.caches: dict[int, TreeCache] = {}  # rows bucket R -> its cache (CUDA graphs read fixed buffers)
        self.cache: TreeCache | None = None  # the current pass's
        self.max_len = 0
        self.features = getattr(self.drafter, "feature_layers", None)  # the target's hidden states it reads
        if self.features is not None:
            _check_feature_layers(self.features, self.eager_target)
        self._aux = None  # the latest target pass's features [R, N, F] (a drafter with feature_layers)
        self.runner = VerifyRunner(self.verify_model, self.cuda_graphs, self._cache_position, self.policy,
                                   hidden=self.features)
        # the plain target with transformers' batched_mm experts is one more exact path where the model's experts
        # dispatch grouped_mm (its default): in-graph gathers and bmm beat grouped_mm's opaque per-expert loop on
        # small passes (bundled target, CPU: passes of 1, 6 and 17 tokens 1.6-2.0x, 2.0-2.4x and 2.0-2.7x faster)
        # (not for offloaded experts, whose forward is moespec's, nor sharded ones, whose weights are DTensors)
        batched = _experts_configs(self.eager_target) if self._exact_any_n and not offloaded and \
            self.ranks is None else []
        more = {BATCHED: partial(self._plain_pass, plain_compiled(self.verify_model, BATCHED), batched)
                } if batched else {}
        self.exact_one = None if self.verify_model is self.eager_target else FastestExact(
            lambda cache, *a: self.runner(cache, *a, None, None), partial(self._plain_pass, self.plain_target, ()),
            self._clock, **more)
        self.measuring = False  # the latest verify pass ran on a path FastestExact was still measuring
        self._buffers: dict[tuple, dict[str, torch.Tensor]] = {}  # (R, N) -> a pass's input buffers

    # --- the loop ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 128, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, eos_token_id=_UNSET,
                 generator: torch.Generator | None = None, tree=_UNSET, budget=_UNSET, attention_mask=None,
                 pad_token_id=_UNSET) -> GenerateOutput:
        """Generate up to max_new_tokens after input_ids [B, L] (or [L]); each row stops after its first EOS
        (included). attention_mask [B, L]: left padding (0s before each row's tokens).

        With do_sample=False the output equals the target's own greedy decoding when the budget is None.
        Sampling keeps the target's distribution (after temperature, top_k, top_p) exactly. Rows stop on their own:
        .sequences is [B, L + the longest row's new tokens], padded after a row's end with pad_token_id (default:
        generation_config's, else the first EOS) as transformers returns it; .stats counts all rows, .stats.rows[b]
        each."""
        max_new_tokens = check_int(max_new_tokens, "max_new_tokens", 1)
        if self._training is not None and self.eager_target.training != self._training:
            raise ValueError(f"the target was put in {'train' if self.eager_target.training else 'eval'} mode after "
                             "this decoder compiled its passes, which keep the mode they were compiled in: make a "
                             "new SpeculativeDecoder (or restore the mode)")
        sampling = SamplingConfig(do_sample, temperature, top_p, top_k)
        ctl = self._auto(tree, budget)
        shape = ctl.envelope() if ctl else self.tree if tree is _UNSET else self._tree_shape(tree)
        schedule = self.budget if budget is _UNSET or ctl else _refuse_unbound(_check_budget(budget),
                                                                              self._budgets_bind)
        eos = self._eos_set(eos_token_id)
        ids, mask = check_batch(check_input_ids(torch.as_tensor(input_ids), self.vocab_size), attention_mask)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with passive_omp_threads(self.device):  # one thread where OpenMP's threads sleep between regions
            if self.ranks is not None:
                self.ranks.check_same(torch.cat([ids, mask]), max_new_tokens, do_sample, temperature, top_p, top_k or 0)
                generator = self.ranks.generator(generator) if do_sample else generator
            stats = GenerateStats(rows=[RowStats() for _ in range(ids.shape[0])])
            t = self._clock()
            # tree=0: autoregressive through the verify path; auto: a request its autoregressive set phase outlasts
            # starts no drafter (the ranks of a sharded target keep theirs started: their phases may differ)
            drafting = (ctl.drafts_within(max_new_tokens) if self.ranks is None else ctl.drafts) if ctl \
                else shape.max_nodes > 0
            self.begin(ids, mask, max_new_tokens, shape, sampling, generator, drafting, eos)
            stats.time_prefill = self._clock() - t
            t_loop = self._clock()
            while any(self.live):
                self._pack()
                if ctl:
                    ctl.step(self, sampling, generator, stats)
                else:
                    c = schedule(stats.steps) if callable(schedule) else schedule
                    self._step(shape, c, sampling, generator, stats)
            stats.time_host = max(self._clock() - t_loop - stats.time_draft - stats.time_verify - stats.time_accept,
                                  0.0)
            for rs, toks in zip(stats.rows, self.new):
                rs.new_tokens = len(toks)
            stats.new_tokens = sum(len(t) for t in self.new)
            return GenerateOutput(self._sequences(ids, pad_token_id, eos), stats)

    def begin(self, ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int, shape, sampling,
              generator=None, drafting: bool = False, eos=frozenset()) -> None:
        """A new request: caches sized for it, the prompts' exact prefill (-> each row's first token), the drafter
        started on the prompts when drafting. ids [B, L]; mask [B, L] (None: no padding)."""
        b, length = ids.shape
        mask = torch.ones_like(ids) if mask is None else mask
        r = pick_bucket(b, self.row_buckets)
        rows_ids = torch.cat([ids, ids[:1].expand(r - b, length)])  # padding rows repeat row 0
        pad = (length - torch.cat([mask, mask[:1].expand(r - b, length)]).sum(1)).tolist()
        self._allocate(length + max_new_tokens, shape)
        self.row_of = list(range(b)) + [-1] * (r - b)  # cache row -> batch row (-1: padding or finished)
        self.live = [row >= 0 for row in self.row_of]
        self.new: list[list[int]] = [[] for _ in range(b)]
        self.eos, self.max_new, self._drafts = eos, max_new_tokens, drafting
        self.cache = self._cache_for(r)
        self.roots = self.prefill(rows_ids, pad, sampling, generator)
        if drafting:
            self.drafter.start(rows_ids, pad, self.max_len, **self._drafter_features())
        self._emit(self.roots)

    def _step(self, shape, c, sampling, generator, stats: GenerateStats) -> int:
        """draft -> verify -> accept for every live row -> tokens emitted by all rows (accepted drafts + bonus)."""
        live, roots = list(self.live), self.roots
        drafting = self._drafts and shape.max_nodes > 0
        t0 = self._clock()
        tree = self.drafter.draft(roots, shape, live) if drafting else \
            DraftTree.root_only(torch.tensor(roots, device=self.device))
        t1 = self._clock()
        logits, vstat = self.verify(tree, c)
        t2 = self._clock()
        acc = self.accept(self._tree, logits, sampling, generator, drafting)
        if self._drafts and not drafting:  # the drafter catches up on tokens committed without a draft
            self.drafter.skip(roots, live, **self._drafter_features(self._aux[:, :1] if self.features else None))
        t3 = self._clock()
        emitted = 0
        for i, alive in enumerate(live):
            if alive:
                rs = stats.rows[self.row_of[i]]
                rs.steps += 1
                rs.accepted_per_step.append(len(acc.tokens[i]))
                emitted += len(acc.tokens[i])
        self._emit(acc.bonus, acc.tokens)
        vstat.accepted, vstat.tokens = emitted, acc.nodes
        stats.steps += 1
        stats.accepted_per_step.append(emitted)
        stats.verify.append(vstat)
        stats.time_draft += t1 - t0
        stats.time_verify += t2 - t1
        stats.time_accept += t3 - t2
        return emitted

    def prefill(self, rows_ids: torch.Tensor, pad: list[int], sampling: SamplingConfig, generator=None):
        """Exact (never budgeted) forward of the left-padded prompts [R, L] through the uncompiled target -> the
        first token of every row (host list)."""
        r, length = rows_ids.shape
        cache = self.cache
        cache.set_pad(pad)
        slots = torch.arange(length, device=self.device).expand(r, length)
        pos = (slots - cache.pad_t[:, None]).clamp(min=0)
        with budget_ctx(None):
            logits = self._features_of(forward(self.eager_target, cache, rows_ids, pos,
                                               self.masks.prompt(cache.pad, length), slots, self._cache_position,
                                               self.features))[:, -1, : self.vocab_size]
        cache.lengths = [length] * r
        if not sampling.do_sample:
            return logits.argmax(-1).tolist()
        probs = process_logits(logits, sampling)
        return torch.multinomial(probs.cpu() if generator is not None else probs, 1, generator=generator)[:, 0].tolist()

    def verify(self, tree: DraftTree, c) -> tuple[torch.Tensor, VerifyStats]:
        """One forward of every row's padded tree through the target under exactly budget C -> logits [R, N, V].

        Row b's nodes sit after its prefix (slots lengths[b] ..), at positions lengths[b] - pad_b + depth. Padding
        nodes (a narrower row's, and every node of a row not live) repeat the root (same token, position and mask
        row), so they compute exactly the root's output; they weigh 0 in the budget's expert scores
        (msc.token_weights), as they must not vote. The nodes weigh as self.node_weights says. The padded tree is
        kept in self._tree for the acceptance."""
        cache, dev = self.cache, self.device
        r, n = tree.tokens.shape
        big_n = pick_bucket(n, self.tree_buckets)
        if r * big_n > MAX_TOKENS:
            raise ValueError(f"a verify pass of {r} rows x {big_n} tree tokens exceeds the {MAX_TOKENS} tokens "
                             "msc.token_weights covers; use fewer rows or a smaller tree")
        if cache.length + big_n > cache.max_len:
            raise RuntimeError(f"KV cache of {cache.max_len} slots is full ({cache.length} + {big_n})")
        live = self.live if len(self.live) == r else [True] * r
        tree = self._tree = tree.padded(big_n, None if all(live) else torch.tensor(live, device=dev))
        buf = self._pass_buffers(r, big_n)
        anc = ancestors(tree.parents, self._max_depth, out=buf["anc"], chain=tree.chain)
        self._has_padding = big_n > n or r > 1 or not all(live)  # padding nodes (one row's own tree has none)
        if self._has_padding:
            anc &= tree.valid[..., None]
            anc[..., 0] |= ~tree.valid  # padding nodes see what the root sees
        self._anc = anc
        start = torch.tensor(cache.lengths, device=dev)
        tokens, pos, slots = buf["tokens"], buf["pos"], buf["slots"]
        tokens.copy_(tree.tokens)
        torch.add((start - cache.pad_t)[:, None], tree.depth, out=pos)
        torch.add(start[:, None], buf["arange"], out=slots)
        mask = self.masks.tree(anc, cache.lengths, cache.pad, pos, pos)
        weights = None if c is None else node_weights(tree, self.node_weights)  # exact: nothing to rank
        stat = VerifyStats(tree_size=n, bucket=big_n, budget=c, rows=sum(live), row_bucket=r)
        self.measuring = False
        if c is None and self.exact_choice(big_n):  # an exact pass (an AR step, exact speculation): the faster path
            logits = self.exact_one(cache, tokens, pos, mask, slots)
            stat.path, self.measuring = self.exact_one.last, self.exact_one.measuring
        elif self.records_experts():
            counters = tables(dev)["stats"]
            before = counters.clone()
            logits = self.runner(cache, tokens, pos, mask, slots, c, weights)
            _expert_stats(stat, pass_counts(before, counters))
        else:
            logits = self.runner(cache, tokens, pos, mask, slots, c, weights)
        self._start = start
        return self._features_of(logits)[..., : self.vocab_size], stat

    def accept(self, tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig, generator=None,
               tell_drafter: bool = True):
        """Pick each live row's path and bonus (accept.py), then move the paths' KV into place after the prefixes
        (nothing to move where every path's nodes are already in place, as in a chain)."""
        padded = self._has_padding or len(self.live) != tree.rows
        live = torch.tensor(self.live, device=self.device) if len(self.live) == tree.rows else None
        if sampling.do_sample:
            acc = accept_sample(tree, logits, sampling, live, generator)
        else:
            acc = accept_greedy(tree, logits, self._anc, live if padded else None)
        if any(p != list(range(len(p))) for p in acc.paths):
            self.cache.compact(acc.order, self._start)
        self.cache.lengths = [n + len(p) for n, p in zip(self.cache.lengths, acc.paths)]
        if tell_drafter:
            path = None
            if self.features is not None:  # the path's nodes first, in path order (a chain's order is its own)
                path = self._aux if tree.chain else \
                    self._aux.gather(1, acc.order[..., None].expand(*acc.order.shape, self._aux.shape[-1]))
            self.drafter.accept(acc, self.live, **self._drafter_features(path))
        return acc

    # --- rows: emitted tokens, finishing, packing -----------------------------------------------------
    def _emit(self, bonus: list[int], paths: list[list[int]] | None = None) -> None:
        """Append each live row's accepted drafted tokens and bonus; a row finishes at EOS or max_new_tokens; the
        bonus tokens become the next roots."""
        for i, row in enumerate(self.row_of):
            if not self.live[i]:
                continue
            out = self.new[row]
            for tok in (paths[i][1:] if paths else []) + [bonus[i]]:
                out.append(tok)
                if tok in self.eos or len(out) >= self.max_new:
                    self.live[i] = False
                    break
        self.roots = list(bonus)

    def _pack(self) -> None:
        """Move the live rows into the smallest rows bucket that holds them (device copies, no host loop over the
        cache); the bucket's spare rows repeat a live row and stay dead."""
        live = [i for i, alive in enumerate(self.live) if alive]
        r = pick_bucket(len(live), self.row_buckets)
        if r >= len(self.row_of):
            return
        keep = live + [live[0]] * (r - len(live))
        cache = self._cache_for(r)
        cache.copy_rows(self.cache, keep)
        self.cache = cache
        if self._drafts:
            self.drafter.select(keep)
        self.roots = [self.roots[i] for i in keep]
        self.row_of = [self.row_of[i] for i in live] + [-1] * (r - len(live))
        self.live = [True] * len(live) + [False] * (r - len(live))

    def _sequences(self, ids: torch.Tensor, pad_token_id, eos: set[int]) -> torch.Tensor:
        """[B, L + longest row's new tokens]: prompts as given, new tokens, then the pad token (transformers'
        layout; a row that stopped at EOS is padded after it)."""
        width = max(len(t) for t in self.new)
        if any(len(t) < width for t in self.new):
            if pad_token_id is _UNSET:
                pad_token_id = getattr(getattr(self.eager_target, "generation_config", None), "pad_token_id", None)
                if pad_token_id is None and eos:
                    first = self._eos_set(_UNSET, first=True)
                    pad_token_id = sorted(eos)[0] if first is None else first
            if pad_token_id is None:
                raise ValueError("rows finished at different lengths and there is no pad token: pass pad_token_id "
                                 "(or set generation_config.pad_token_id or eos_token_id)")
        fill = 0 if pad_token_id in (None, _UNSET) else pad_token_id
        out = torch.tensor([t + [fill] * (width - len(t)) for t in self.new], dtype=ids.dtype)
        return torch.cat([ids, out.to(ids.device)], dim=1)

    # --- helpers -----------------------------------------------------------------------------------
    def _tree_shape(self, tree):
        shape = as_tree_shape(tree)
        check_tree_fits_vocab(shape, self.vocab_size)
        self.fit_pass_size(shape)
        return shape

    def fit_pass_size(self, shape) -> int:
        """Make a full tree of `shape` (root included) a pass size of its own -> that size. A chain of 4 verifies
        5 tokens, not 8: padding costs a pass what the padding rows compute (the bundled target's verify, measured
        side by side on a 2-core CPU: 6.1-6.8 ms at 5 tokens, 7.1-7.8 at 8; 8.9-9.8 at 17, 9.5-10.3 at 24).
        Smaller trees of the shape (a drafter that stops early) pad to the next size.
        Only with the default tree_buckets: sizes given by the caller are kept as given."""
        n = shape.max_nodes + 1
        if self._fit_sizes and n not in self.tree_buckets:
            self.tree_buckets = tuple(sorted((*self.tree_buckets, n)))
        return n

    def _auto(self, tree, budget):
        """The controller, started for a request, when this call's tree or budget is "auto" (else None)."""
        tree = self._tree_arg if tree is _UNSET else tree
        budget = self._budget_arg if budget is _UNSET else budget
        if tree != "auto" and budget != "auto":
            return None
        if self.controller is None or (tree, budget) != (self._tree_arg, self._budget_arg):
            raise ValueError("tree='auto' / budget='auto' are chosen when the decoder is made "
                             "(SpeculativeDecoder(..., tree='auto', budget='auto', min_budget=...))")
        if not hasattr(self.controller, "decoder"):
            self.controller.bind(self)
        self.controller.start()
        return self.controller

    def _eos_set(self, eos_token_id, first: bool = False):
        """The EOS ids (default: generation_config's); first=True: the first of generation_config's, or None."""
        if eos_token_id is _UNSET:
            eos_token_id = getattr(getattr(self.eager_target, "generation_config", None), "eos_token_id", None)
        ids = [] if eos_token_id is None else list(eos_token_id) if isinstance(eos_token_id, (list, tuple, set)) \
            else [eos_token_id]
        return (int(ids[0]) if ids else None) if first else {int(e) for e in ids}

    def _allocate(self, seq_len: int, shape) -> None:
        """Caches of max_len slots: the sequence, a verify pass past an overshooting path, the drafter's fed nodes.
        Reallocated (and captured graphs dropped) only when a longer sequence comes; the recompile limit covers one
        graph per pass shape (R, N), two where exact passes choose between two compiled paths."""
        nodes = pick_bucket(shape.max_nodes + 1, self.tree_buckets)
        self._max_depth = max(shape.depth, 1)
        need = seq_len + 2 * nodes + shape.depth + 4
        if isinstance(shape, TreeSpec):
            need += shape.top_k * max(shape.depth - 1, 0)  # the drafter's fed nodes
        elif isinstance(shape, StaticTree):
            need += nodes
        if need > self.max_len:
            self.max_len = -(-need // 64) * 64
            self.caches.clear()
            self.runner.reset()
            self.masks = Masks(self.eager_target, self.max_len)
        allow_recompiles((2 if self._exact_any_n else 1) * len(self.tree_buckets) * len(self.row_buckets) + 8)

    def _cache_for(self, r: int) -> TreeCache:
        if r not in self.caches:
            self.caches[r] = TreeCache.for_model(self.eager_target, self.max_len, self.device, rows=r)
        return self.caches[r]

    def _pass_buffers(self, r: int, big_n: int) -> dict[str, torch.Tensor]:
        """A verify pass's inputs, allocated once per pass shape (R, N) and rewritten in place every step: tokens,
        positions, write slots [R, N] and the ancestor matrices [R, N, N] (which acceptance reads)."""
        buf = self._buffers.get((r, big_n))
        if buf is None:
            dev = self.device
            buf = self._buffers[(r, big_n)] = {
                "tokens": torch.zeros(r, big_n, dtype=torch.long, device=dev),
                "pos": torch.zeros(r, big_n, dtype=torch.long, device=dev),
                "slots": torch.zeros(r, big_n, dtype=torch.long, device=dev),
                "arange": torch.arange(big_n, device=dev),
                "anc": torch.zeros(r, big_n, big_n, dtype=torch.bool, device=dev),
            }
        return buf

    def exact_choice(self, big_n: int) -> bool:
        """Do exact passes of padded size N choose between the moespec graph and the plain target
        (``self.exact_one``, FastestExact)? One-token passes do wherever the target is compiled; larger ones where
        the plain target is compiled too and collect_expert_stats is not True."""
        any_n = self._exact_any_n and self.collect_expert_stats is not True
        return self.exact_one is not None and (big_n == 1 or any_n)

    def records_experts(self) -> bool:
        """Do passes in the moespec graph record their experts (collect_expert_stats not False, no graph replay)?"""
        return self.collect_expert_stats is not False and not self.cuda_graphs

    def settle_exact(self, tree: DraftTree) -> int:
        """Run exact verify passes of `tree` until the decoder has kept its faster exact path for the tree's pass
        shape (nothing where that size does not choose) -> passes run. For timing exact passes as decoding runs them
        (msc.profile, benchmarks); the cache is not advanced."""
        big_n = pick_bucket(tree.size, self.tree_buckets)
        runs = 0
        while self.exact_choice(big_n) and not self.exact_one.settled((tree.rows, big_n)):
            self.verify(tree, None)
            runs += 1
        return runs

    def _plain_pass(self, model, configs, cache, tokens, positions, mask, slots) -> torch.Tensor:
        """An exact pass on a plain target; configs: those whose experts run as batched_mm meanwhile."""
        with budget_ctx(None), _experts_implementation(configs, BATCHED):
            return forward(model, cache, tokens, positions, mask, slots, self._cache_position, self.features)

    def _features_of(self, out):
        """A target pass's output -> its logits; with a drafter that reads features, keeps them in self._aux."""
        if self.features is None:
            return out
        logits, self._aux = out
        return logits

    def _drafter_features(self, aux=_UNSET) -> dict:
        """The features= argument of the drafter's calls (none for a drafter without feature_layers)."""
        if self.features is None:
            return {}
        return {"features": self._aux if aux is _UNSET else aux}

    def _clock(self) -> float:
        if self.timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _check_feature_layers(layers, target) -> None:
    """The hidden_states indices a drafter reads: ints in [0, L) (hidden_states[L] has the final norm applied;
    the last layer's pre-norm output is no verify pass's output)."""
    n = target.config.get_text_config(decoder=True).num_hidden_layers
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in layers):
        raise ValueError(f"the drafter's feature_layers {tuple(layers)} must be hidden_states indices in [0, {n}) "
                         f"for a target of {n} layers (index {n}, the last layer's pre-norm output, is not an "
                         "output of the verify pass)")


def plain_compiled(verify_model, experts: str | None = None):
    """The unmodified model under `verify_model` (a moespec-compiled model) compiled by inductor (dynamic=False: one
    graph per pass shape); experts: traced with that transformers experts implementation (BATCHED), which its caller
    switches on around every call (_experts_implementation). One per moespec compilation and implementation, kept on
    it and shared by every decoder that verifies through it (each torch.compile of a model adds cache entries to the
    same code); it lives as long as that compilation."""
    key = "_moespec_plain" + (f"_{experts}" if experts else "")
    plain = verify_model.__dict__.get(key)
    if plain is None:  # set through __dict__: not a submodule (state_dict and named_modules stay the model's)
        plain = verify_model.__dict__[key] = compile_pass(verify_model._orig_mod)
    return plain


BATCHED = "batched_mm"  # transformers' experts implementation that gathers each (token, expert) pair's weights


def _experts_configs(model) -> list:
    """The configs of `model`'s modules whose experts dispatch transformers' "grouped_mm" (the default of its
    experts interface), where that interface also has BATCHED -> those configs ([]: nothing to switch)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return []
    if BATCHED not in ALL_EXPERTS_FUNCTIONS.valid_keys():
        return []
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_experts_implementation_internal", None) == "grouped_mm"}
    return list(configs.values())


@contextlib.contextmanager
def _experts_implementation(configs, impl: str):
    """Inside: `configs`' experts dispatch `impl` (what transformers' experts modules read on every call, also while
    dynamo traces); restored after."""
    before = [c._experts_implementation_internal for c in configs]
    for c in configs:  # object.__setattr__: a private field, set twice a pass, past the configs' validating setattr
        object.__setattr__(c, "_experts_implementation_internal", impl)
    try:
        yield
    finally:
        for c, b in zip(configs, before):
            object.__setattr__(c, "_experts_implementation_internal", b)


def _check_budget(budget):
    return budget if callable(budget) else validate_budget(budget)


def _refuse_unbound(budget, binds: bool):
    """A budget binds only inside a moespec-compiled target: refuse it elsewhere rather than report a budget that
    did not apply (issue 14). Returns the budget."""
    if budget is not None and not binds:
        raise ValueError(f"budget={budget!r} needs a target compiled with the moespec backend: pass compile=True, "
                         "or compile the target with torch.compile(target, backend=\"moespec\") yourself; "
                         "this target would ignore the budget (use budget=None for exact decoding)")
    return budget


def _expert_stats(stat: VerifyStats, counts) -> None:
    """counts: budget.pass_counts of the pass."""
    if not counts:
        return
    stat.experts_per_layer = {block: n for block, n, _c in counts}
    stat.layer_budgets = {block: c for block, _n, c in counts}
    stat.budget_bound = any(c is not None and n >= c for _block, n, c in counts)
