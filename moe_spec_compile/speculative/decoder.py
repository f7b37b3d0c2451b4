"""The speculative decoding loop: prefill, then draft -> verify -> accept until done.

prompt --prefill (exact)--> root; loop: draft tree below root -> one verify pass of the padded tree
(tree mask, exactly budget C, node weights; padding weighs 0) -> accept path + bonus -> compact the KV cache
-> next root

Legend: L prompt length, n tree nodes (root included), N padded pass size, S cache slots, V vocabulary.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from ..backend import allow_recompiles, is_moespec_compiled, moespec_options
from ..budget import budget as budget_ctx
from ..budget import validate_budget, validate_policy
from ..record import record_experts
from .accept import Acceptance, SamplingConfig, accept_greedy, accept_sample
from .buckets import DEFAULT_TREE_BUCKETS, FastestExact, VerifyRunner, pick_bucket
from .checks import check_compile_options, check_input_ids, check_int, check_tree_fits_vocab, warn_slow_cpu_environment
from .controller import make_controller
from .drafters import Drafter, ModelDrafter, NgramDrafter
from .kv import Masks, TreeCache, forward, takes_cache_position
from .tree import DraftTree, StaticTree, TreeSpec, ancestors, as_tree_shape
from .weights import DEFAULT_NODE_WEIGHTS, node_weights, validate_node_weights

__all__ = ["SpeculativeDecoder", "GenerateOutput", "GenerateStats", "VerifyStats"]

_UNSET = object()


@dataclass
class VerifyStats:
    tree_size: int  # nodes drafted + root
    bucket: int  # the padded pass size N
    budget: int | None  # the budget C this pass ran under, exactly as asked (None: exact)
    accepted: int  # tokens this step emitted (accepted drafted tokens + the bonus)
    experts_per_layer: dict[str, int] | None = None  # distinct experts each MoE block used (None: not recorded)
    budget_bound: bool | None = None  # some block used all the experts its budget allowed
    layer_budgets: dict[str, int | None] | None = None  # the C each block applied: C clamped to [k, E], None when
    #                                                     C >= E (exact); None: not recorded
    path: str = "moespec"  # the path that ran it: "moespec", or "plain" (an exact pass on the plain target)


@dataclass
class GenerateStats:
    steps: int = 0  # verify passes
    new_tokens: int = 0
    accepted_per_step: list[int] = field(default_factory=list)  # tokens emitted per step (bonus included)
    verify: list[VerifyStats] = field(default_factory=list)
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_accept: float = 0.0
    time_host: float = 0.0  # the loop's own work between the phases (stopping checks, bookkeeping, the controller)
    decisions: list = field(default_factory=list)  # tree="auto" / budget="auto": one controller.Decision per step

    @property
    def tokens_per_step(self) -> float:
        """Mean accepted length: tokens emitted per verify pass, bonus included."""
        return sum(self.accepted_per_step) / max(len(self.accepted_per_step), 1)

    @property
    def buckets(self) -> list[tuple[int, int | None]]:
        return sorted({(v.bucket, v.budget) for v in self.verify}, key=lambda b: (b[0], b[1] or 0))

    @property
    def time_total(self) -> float:
        return self.time_prefill + self.time_draft + self.time_verify + self.time_accept + self.time_host

    def experts_per_layer(self) -> float | None:
        """Mean distinct experts per MoE layer per verify pass (None: not recorded)."""
        counts = [n for v in self.verify if v.experts_per_layer for n in v.experts_per_layer.values()]
        return sum(counts) / len(counts) if counts else None

    def summary(self) -> dict:
        """Named, rounded figures: counts, tokens per verify pass (bonus included), tokens/s over the
        timed phases, experts per layer per verify pass, the share of passes where the budget bound,
        and the time per phase in seconds (4 significant digits)."""
        bound = [v.budget_bound for v in self.verify if v.budget_bound is not None]
        experts = self.experts_per_layer()
        total = self.time_total
        return {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "tokens_per_step": round(self.tokens_per_step, 3),
            "tokens_per_s": round(self.new_tokens / total, 2) if total > 0 else None,
            "experts_per_layer": None if experts is None else round(experts, 2),
            "budget_bound_fraction": round(sum(bound) / len(bound), 3) if bound else None,
            "buckets": self.buckets,
            "time_s": {name: _sig(value) for name, value in (
                ("prefill", self.time_prefill), ("draft", self.time_draft), ("verify", self.time_verify),
                ("accept", self.time_accept), ("host", self.time_host), ("total", total))},
        }

    def __str__(self) -> str:
        s = self.summary()
        t = s["time_s"]
        rows = [
            ("new tokens", f"{s['new_tokens']} in {s['steps']} verify passes"),
            ("tokens per pass", f"{s['tokens_per_step']:.2f} (accepted drafts + 1 bonus)"),
            ("tokens/s", "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f} (prefill included)"),
            ("experts/layer", "not recorded" if s["experts_per_layer"] is None
             else f"{s['experts_per_layer']:.1f} per verify pass"),
            ("budget bound", "-" if s["budget_bound_fraction"] is None
             else f"in {s['budget_bound_fraction']:.0%} of verify passes"),
            ("time (s)", "  ".join(f"{k} {v:.3g}" for k, v in t.items())),
            ("buckets", ", ".join(f"{n} tokens C={'exact' if c is None else c}" for n, c in s["buckets"]) or "-"),
        ]
        return "\n".join(f"{name:<16} {value}" for name, value in rows)


def _sig(seconds: float) -> float:
    """4 significant digits: readable, and a positive time never rounds to 0."""
    return float(f"{seconds:.4g}")


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [1, L + new tokens]
    stats: GenerateStats


class SpeculativeDecoder:
    """Speculative decoding of a (MoE) target with a drafter, verifying draft trees under an expert budget.

        dec = SpeculativeDecoder(target, drafter=ModelDrafter(draft), tree=TreeSpec(32, 5, 4), budget=16)
        out = dec.generate(input_ids, max_new_tokens=128)        # out.sequences, out.stats

    target: a transformers causal LM, plain or already ``torch.compile``-d; ``compile=True`` compiles it
    here with backend="moespec" (``compile_options`` go to the backend, e.g. ``{"inner": "eager"}``; through
    inductor, the default, a ModelDrafter's forward is compiled too), one graph per tree-size bucket (dynamo's
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
    cuda_graphs: capture each tree-size bucket's verify pass once (default: on CUDA).
    collect_expert_stats: record experts per layer per verify pass (reads ids back to the host). None (default):
    record the passes that run in the moespec graph anyway (budgeted ones, exact ones where that path is the
    faster), never moving a pass off its faster path, and never while replaying graphs (Python does not run
    there; msc.expert_stats() reads device counters); True: every exact pass of N > 1 stays in the moespec graph,
    which counts it (slower where the plain graph is faster); False: nothing recorded.
    Batches [B, L]: generate with attention_mask.
    Exact passes (no budget) run on the faster of two exact paths, measured per pass size on this device
    (buckets.FastestExact; each pass's ``path`` in out.stats says which): the moespec graph and the plain target.
    The plain target is the unmodified model compiled by inductor where the moespec graph's inner compiler is
    inductor and no CUDA graph is replayed (then every pass size, except where collect_expert_stats=True keeps
    passes of N > 1 in the moespec graph), else the eager model (one-token passes).
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
            self.verify_model = torch.compile(self.eager_target, backend="moespec", dynamic=False, options=options)
            _allow_recompiles(len(tree_buckets or DEFAULT_TREE_BUCKETS) + 8)
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
        warn_slow_cpu_environment(self.device)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
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
        if self._exact_any_n:
            _allow_recompiles(2 * len(self.tree_buckets) + 8)  # two compiled graphs per pass size
        self.timing = timing
        self.vocab_size = self.eager_target.config.get_text_config(decoder=True).vocab_size
        self.tree = self._tree_shape(0 if tree == "auto" else tree)
        for shape, _ in self.controller.configs if self.controller is not None else ():
            self.fit_pass_size(shape)  # every shape the controller may pick runs at its own size
        if hasattr(self.drafter, "vocab_size") and self.drafter.vocab_size is None:
            self.drafter.vocab_size = self.vocab_size
        self._cache_position = takes_cache_position(self.eager_target)
        self.cache: TreeCache | None = None
        self.runner: VerifyRunner | None = None
        self.exact_one: FastestExact | None = None
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}  # pass size N -> its input buffers (_pass_buffers)

    # --- the loop ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 128, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, eos_token_id=_UNSET,
                 generator: torch.Generator | None = None, tree=_UNSET, budget=_UNSET, attention_mask=None,
                 pad_token_id=_UNSET) -> GenerateOutput:
        """Generate up to max_new_tokens after input_ids [1, L]; stops after the first EOS (included).

        With do_sample=False the output equals the target's own greedy decoding when the budget is None.
        Sampling keeps the target's distribution (after temperature, top_k, top_p) exactly.
        A batch (input_ids [B, L], B > 1, or a mask with padding; attention_mask [B, L] left-padded) goes
        to batched.BatchedGenerator: rows stop on their own, .sequences is [B, L + the longest row's new
        tokens] padded with pad_token_id (default: generation_config's, else the first EOS) as
        transformers returns it, and .stats is a batched.BatchGenerateStats (per row and overall)."""
        max_new_tokens = check_int(max_new_tokens, "max_new_tokens", 1)
        sampling = SamplingConfig(do_sample, temperature, top_p, top_k)
        ctl = self._auto(tree, budget)
        shape = ctl.envelope() if ctl else self.tree if tree is _UNSET else self._tree_shape(tree)
        schedule = self.budget if budget is _UNSET or ctl else _refuse_unbound(_check_budget(budget),
                                                                              self._budgets_bind)
        eos = self._eos_set(eos_token_id)
        if _is_batch(check_input_ids(torch.as_tensor(input_ids), self.vocab_size), attention_mask):
            if ctl:
                raise ValueError("tree='auto' / budget='auto' decode one row at a time; for a batch give the "
                                 "decoder a tree and a budget")
            return self._generate_batch(input_ids, attention_mask, max_new_tokens, sampling, shape, schedule, eos,
                                        pad_token_id, generator)
        ids = self._check_input(input_ids)
        stats = GenerateStats()
        self._allocate(ids.shape[1] + max_new_tokens, shape)

        t = self._clock()
        root = self.prefill(ids, sampling, generator)
        drafting = ctl.drafts if ctl else shape.max_nodes > 0  # tree=0: autoregressive, through the verify path
        if drafting:
            self.drafter.start(ids, self.cache.max_len)
        stats.time_prefill = self._clock() - t
        new = [root]
        t_loop = self._clock()
        while len(new) < max_new_tokens and root not in eos:
            if ctl:
                emitted = ctl.step(self, root, sampling, generator, stats)
            else:
                c = schedule(stats.steps) if callable(schedule) else schedule
                emitted = self._step(root, shape, c, sampling, generator, drafting, stats)
            new.extend(emitted)
            root = emitted[-1]
            if eos & set(emitted):
                break
        stats.time_host = max(self._clock() - t_loop - stats.time_draft - stats.time_verify - stats.time_accept, 0.0)
        new = _truncate(new, max_new_tokens, eos)
        stats.new_tokens = len(new)
        out = torch.cat([ids, torch.tensor([new], dtype=ids.dtype, device=ids.device)], dim=1)
        return GenerateOutput(out, stats)

    def _step(self, root: int, shape, c, sampling, generator, drafting: bool, stats: GenerateStats) -> list[int]:
        """draft -> verify -> accept; returns the tokens emitted (accepted drafted tokens, then the bonus)."""
        t0 = self._clock()
        tree = self.draft(root, shape) if drafting else DraftTree.root_only(torch.tensor(root, device=self.device))
        t1 = self._clock()
        logits, vstat = self.verify(tree, c)
        t2 = self._clock()
        acc = self.accept(tree, logits, sampling, generator, drafting)
        t3 = self._clock()
        emitted = acc.tokens[1:] + [acc.bonus]
        vstat.accepted = len(emitted)
        stats.steps += 1
        stats.accepted_per_step.append(len(emitted))
        stats.verify.append(vstat)
        stats.time_draft += t1 - t0
        stats.time_verify += t2 - t1
        stats.time_accept += t3 - t2
        return emitted

    def prefill(self, ids: torch.Tensor, sampling: SamplingConfig, generator=None) -> int:
        """Exact (never budgeted) forward of the prompt through the uncompiled target -> first token."""
        n = ids.shape[1]
        pos = torch.arange(n, device=self.device)
        with budget_ctx(None):
            logits = forward(self.eager_target, self.cache, ids[0], pos, self.masks.causal(n, 0, self.device), pos,
                             self._cache_position)
        self.cache.length = n
        root = DraftTree.root_only(ids[0, -1])
        if not sampling.do_sample:
            return int(logits[-1].argmax())
        return accept_sample(root, logits[-1:], sampling, generator).bonus

    def draft(self, root: int, shape) -> DraftTree:
        return self.drafter.draft(root, shape)

    def verify(self, tree: DraftTree, c: int | None) -> tuple[torch.Tensor, VerifyStats]:
        """One forward of the padded tree through the target under exactly budget C -> logits [n, V].

        Padding repeats the root (same token, position and mask row), so a padded row computes exactly
        the root's output; it weighs 0 in the budget's expert scores (msc.token_weights), as it must not
        vote. The nodes weigh as self.node_weights says."""
        n = tree.size
        big_n = pick_bucket(n, self.tree_buckets)
        prefix = self.cache.length
        if prefix + big_n > self.cache.max_len:
            raise RuntimeError(f"KV cache of {self.cache.max_len} slots is full ({prefix} + {big_n})")
        buf = self._pass_buffers(big_n)
        tokens, pos, slots, anc = buf["tokens"], buf["pos"], buf["slots"], buf["anc"]
        tokens[:n] = tree.tokens
        tokens[n:] = tree.tokens[:1]  # padding repeats the root
        pos[:n] = tree.depth
        pos[n:] = 0
        pos += prefix
        torch.add(buf["arange"], prefix, out=slots)
        anc.zero_()
        self._anc = ancestors(tree.parents, int(self._max_depth), out=anc[:n, :n])  # a view: acceptance reads it
        anc[n:, 0] = True  # padding rows see what the root sees
        mask = self.masks.tree(anc, prefix, pos, pos)
        weights = None if c is None else node_weights(tree, self.node_weights, big_n)  # exact: nothing to rank
        stat = VerifyStats(tree_size=n, bucket=big_n, budget=c, accepted=0)
        if c is None and self.exact_choice(big_n):  # an exact pass (an AR step, exact speculation): the faster path
            logits = self.exact_one(tokens, pos, mask, slots)
            stat.path = self.exact_one.last
        elif self.records_experts():
            with record_experts() as rec:
                logits = self.runner(tokens, pos, mask, slots, c, weights)
            _expert_stats(stat, rec.events)
        else:
            logits = self.runner(tokens, pos, mask, slots, c, weights)
        return logits[:n, : self.vocab_size], stat

    def accept(self, tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig, generator=None,
               tell_drafter: bool = True) -> Acceptance:
        """Pick the path and the bonus (accept.py), then move the path's KV into place after the prefix."""
        if sampling.do_sample:
            acc = accept_sample(tree, logits, sampling, generator)
        else:
            acc = accept_greedy(tree, logits, self._anc)
        self.cache.compact(acc.order, self.cache.length)
        self.cache.length += len(acc.path)
        if tell_drafter:
            if acc.payload is None:
                self.drafter.accept(acc.path, acc.tokens + [acc.bonus])
            else:  # the drafter's per-node data for the path, read with the acceptance (DraftTree.payload)
                self.drafter.accept(acc.path, acc.tokens + [acc.bonus], acc.payload)
        return acc

    def _generate_batch(self, input_ids, attention_mask, max_new_tokens, sampling, shape, schedule, eos,
                        pad_token_id, generator) -> GenerateOutput:
        """Batched generation (batched.py); one BatchedGenerator per decoder keeps its caches and graphs."""
        from .batched import BatchedGenerator

        if getattr(self, "_batched", None) is None:
            self._batched = BatchedGenerator(self)
        if pad_token_id is _UNSET:
            pad_token_id = getattr(getattr(self.eager_target, "generation_config", None), "pad_token_id", None)
            if pad_token_id is None and eos:
                pad_token_id = (self._eos_list() or sorted(eos))[0]
        return self._batched.generate(input_ids, attention_mask, max_new_tokens, sampling, shape, schedule, eos,
                                      pad_token_id, generator)

    def _eos_list(self) -> list[int]:
        eos = getattr(getattr(self.eager_target, "generation_config", None), "eos_token_id", None)
        return list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]

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
            _allow_recompiles(2 * len(self.tree_buckets) + 8)  # two compiled graphs (moespec, plain) per size
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

    def _check_input(self, input_ids) -> torch.Tensor:
        ids = check_input_ids(torch.as_tensor(input_ids), self.vocab_size)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [1, L] with L >= 1, got shape {tuple(ids.shape)}")
        if ids.shape[0] != 1:
            raise ValueError(f"SpeculativeDecoder supports batch size 1 only, got a batch of {ids.shape[0]}; "
                             "loop over the rows (acceptance lengths differ per row)")
        return ids.to(self.device)

    def _eos_set(self, eos_token_id) -> set[int]:
        if eos_token_id is _UNSET:
            eos_token_id = getattr(getattr(self.eager_target, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            return set()
        return {int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id])}

    def _allocate(self, seq_len: int, shape) -> None:
        """(Re)allocate the target's cache when the sequence may not fit; keep it (and its graphs) if it does."""
        nodes = shape.max_nodes + 1
        self._max_depth = shape.depth
        extra = pick_bucket(nodes, self.tree_buckets) + 1
        need = seq_len + extra
        if isinstance(shape, TreeSpec):
            need += shape.top_k * max(shape.depth - 1, 0)  # the drafter's fed nodes
        elif isinstance(shape, StaticTree):
            need += nodes
        if self.cache is None or self.cache.max_len < need:
            max_len = -(-need // 64) * 64
            self.cache = TreeCache.for_model(self.eager_target, max_len, self.device)
            self.masks = Masks(self.eager_target, max_len)
            self.runner = VerifyRunner(self.verify_model, self.cache, self.cuda_graphs, self._cache_position,
                                       self.policy)
            self.exact_one = None if self.verify_model is self.eager_target else FastestExact(
                lambda *a: self.runner(*a, None, None), self._plain_pass, self._clock)
        self.cache.length = 0

    def _pass_buffers(self, big_n: int) -> dict[str, torch.Tensor]:
        """A verify pass's inputs, allocated once per pass size N and rewritten in place every step: tokens,
        positions, write slots [N] and the padded ancestor matrix [N, N] (its top-left n x n block is the tree's own,
        which acceptance reads)."""
        buf = self._buffers.get(big_n)
        if buf is None:
            dev = self.device
            buf = self._buffers[big_n] = {
                "tokens": torch.zeros(big_n, dtype=torch.long, device=dev),
                "pos": torch.zeros(big_n, dtype=torch.long, device=dev),
                "slots": torch.zeros(big_n, dtype=torch.long, device=dev),
                "arange": torch.arange(big_n, device=dev),
                "anc": torch.zeros(big_n, big_n, dtype=torch.bool, device=dev),
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
        size (nothing where that size does not choose) -> passes run. For timing exact passes as decoding runs them
        (msc.profile, benchmarks); the cache is not advanced."""
        big_n = pick_bucket(tree.size, self.tree_buckets)
        runs = 0
        while self.exact_choice(big_n) and not self.exact_one.settled(big_n):
            self.verify(tree, None)
            runs += 1
        return runs

    def _plain_pass(self, tokens, positions, mask, slots) -> torch.Tensor:
        with budget_ctx(None):
            return forward(self.plain_target, self.cache, tokens, positions, mask, slots, self._cache_position)

    def _clock(self) -> float:
        if self.timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def plain_compiled(verify_model):
    """The unmodified model under `verify_model` (a moespec-compiled model) compiled by inductor (dynamic=False: one
    graph per pass size). One per moespec compilation, kept on it and shared by every decoder that verifies through
    it (each torch.compile of a model adds cache entries to the same code); it lives as long as that compilation."""
    plain = verify_model.__dict__.get("_moespec_plain")
    if plain is None:  # set through __dict__: not a submodule (state_dict and named_modules stay the model's)
        plain = verify_model.__dict__["_moespec_plain"] = torch.compile(verify_model._orig_mod, backend="inductor",
                                                                        dynamic=False)
    return plain


def _allow_recompiles(n: int) -> None:
    """One graph per tree-size bucket: dynamo's per-function limit (8 by default, shared by every
    torch.compile of the same model class) would otherwise fall back to eager without a word."""
    allow_recompiles(n)


def _check_budget(budget):
    if budget == "auto":
        raise NotImplementedError("budget='auto' needs a cost model that picks C per step, which this package does "
                                  "not have yet; pass None, an int C, or a callable step -> C")
    return budget if callable(budget) else validate_budget(budget)


def _refuse_unbound(budget, binds: bool):
    """A budget binds only inside a moespec-compiled target: refuse it elsewhere rather than report a budget that
    did not apply (issue 14). Returns the budget."""
    if budget is not None and not binds:
        raise ValueError(f"budget={budget!r} needs a target compiled with the moespec backend: pass compile=True, "
                         "or compile the target with torch.compile(target, backend=\"moespec\") yourself; "
                         "this target would ignore the budget (use budget=None for exact decoding)")
    return budget


def _expert_stats(stat: VerifyStats, events) -> None:
    if not events:
        return
    stat.experts_per_layer = {ev.block: len(ev.experts) for ev in events}
    stat.layer_budgets = {ev.block: ev.budget for ev in events}
    stat.budget_bound = any(ev.budget is not None and len(ev.experts) >= ev.budget for ev in events)


def _is_batch(input_ids, attention_mask) -> bool:
    """Several rows, or one row with padding in its mask (shape errors are raised by batched.check_batch)."""
    from .batched import check_batch

    ids = torch.as_tensor(input_ids)
    if attention_mask is None:
        return ids.dim() == 2 and ids.shape[0] > 1
    _, mask = check_batch(ids, attention_mask)
    return mask.shape[0] > 1 or bool((mask == 0).any())


def _truncate(tokens: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    tokens = tokens[:max_new_tokens]
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens
