"""The controller behind ``tree="auto"`` and ``budget="auto"``: per request, pick the (tree shape, budget) that
maximises Cascade's utility, including no speculation at all.

candidates (tree shapes incl. autoregressive) x (allowed budgets) -> prior (cost model) -> test phase (each
promising candidate a few steps, measured) -> set phase (the best for set_steps) -> test again ...
utility U(config) = tokens per step / (step time / autoregressive step time); U(autoregressive) = 1

Cascade (arXiv 2506.20675), adapted: when no speculative config beats autoregressive decoding the set phase
runs autoregressively and doubles in length at each consecutive fall-back (back-off, up to 2**max_backoff x
set_steps, carried across requests: a request that such a phase outlasts starts no drafter); after it, the best
speculative config is probed for one step, and tested further only if that step looks worth it. Likewise a
speculative config that wins the test phase after its own set phase gets a set phase twice as long (up to
2**max_streak x set_steps), unless it stops paying, which ends the phase and the streak.

Step times are measured per config and kept across requests (the median of the last `window` steps; the
first two runs of each verify bucket are left out: compilation and warm-up; so are a first draft after
autoregressive steps, which feeds the drafter what they committed, and a pass on an exact path the decoder is
still measuring). The acceptance per depth is pooled over recent speculative steps of every config and request
(decaying weights); a chain's tokens per step follow from it by the chain law, a tree's are measured per request
starting from what earlier requests (or the cost model) gave. A verify pass of more tokens never
costs less than a one-token step, so a config's utility is capped at its tokens per step, and speculation
must beat autoregressive decoding by `margin` to be set (timing noise alone never turns it on). A config not
measured yet is estimated: its step-time ratio by the slope through the measured configs (or the cost
model's ratio), its tokens per step by the chain law at the pooled acceptance, else the cost model's
acceptance or ``prior_acceptance``. After a test phase, a config not tried yet
whose estimate beats the best is tested too (hill-climbing, at most max_climbs per phase). Phases span
requests: a short request continues the last one's set phase. A speculative set phase whose measured utility
falls below 1 ends early (a new test phase follows).

budget="auto" picks only budgets the user allowed: ``min_budget=m`` allows m, 2m, 4m, ... (below E) next to
exact verification; without min_budget it stays exact. Greedy output under an exact config equals the
target's greedy output, whichever tree is chosen; sampling keeps the target's distribution.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..cost import chain_tokens, shape_key
from .tree import StaticTree, TreeSpec, as_tree_shape

__all__ = ["Controller", "Decision", "DEFAULT_TREES", "auto_budgets"]

DEFAULT_TREES = (0, 1, 2, 4, TreeSpec(8, 4, 2), TreeSpec(16, 4, 4))
ACCEPT_DECAY = 0.95  # per speculative step: the acceptance estimate weighs about the last 20 steps (_alpha)
MAX_ALPHA = 0.98  # an acceptance of 1 would make every longer chain look free of rejections


@dataclass
class Decision:
    """One step of the trace in ``out.stats.decisions``."""

    step: int
    tree: str  # shape key ("ar", "chain4", "tree16-4-4", ...)
    budget: int | None
    phase: str  # "test", "probe" or "set"
    tokens: int  # tokens the step emitted (all rows)
    seconds: float  # wall time of the step (draft + verify + accept)
    utility: float | None  # tokens per live row / (seconds / AR step estimate); None before the AR step is known


def auto_budgets(min_budget: int | None, num_experts: int, top_k: int) -> tuple:
    """(None, m, 2m, 4m, ...) below E: the budgets budget="auto" may pick; (None,) without min_budget."""
    if min_budget is None:
        return (None,)
    out, c = [None], max(min_budget, top_k)
    while c < num_experts:
        out.append(c)
        c *= 2
    return tuple(out)


class Controller:
    """Chooses (tree shape, budget) per step; see the module docstring.

    trees: candidate shapes (0 = autoregressive; default DEFAULT_TREES with tree="auto"); budgets: allowed
    budgets (None = exact). cost_model: a msc.CostModel (default: the analytic one of the target, built on
    first use); prior_acceptance: the per-depth acceptance assumed when the cost model has none. test_steps:
    measured steps per candidate in a test phase; set_steps: the set phase (doubled per consecutive fall-back
    to autoregressive decoding); explore: test only candidates whose estimated utility reaches this;
    max_tests: candidates per test phase; margin: how much a speculative config must beat autoregressive
    decoding by to be set; window: step times kept per config; ema: smoothing of a tree's tokens per step
    across steps; prior_weight: the prior's weight (in steps) against this request's measured steps of a tree;
    max_climbs: extra candidates a test phase may try when one not tried yet is estimated to beat the best so far;
    max_streak: a speculative config set again right after its own set phase gets a set phase twice as long, up to
    2**max_streak times set_steps (a stable choice is re-tested ever more rarely); max_backoff: likewise for
    autoregressive set phases (a fall-back decided while timings were off, e.g. under another process's load, is
    re-probed within 2**max_backoff x set_steps steps, whichever request they fall in)."""

    def __init__(self, trees=DEFAULT_TREES, budgets=(None,), cost_model=None, prior_acceptance: float = 0.6,
                 test_steps: int = 2, set_steps: int = 16, explore: float = 0.9, max_tests: int = 2,
                 margin: float = 0.1, window: int = 5, ema: float = 0.3, prior_weight: float = 2.0,
                 max_climbs: int = 3, max_streak: int = 4, max_backoff: int = 2):
        shapes = [as_tree_shape(t) for t in trees]
        if not shapes:
            raise ValueError("the controller needs at least one tree shape")
        self.configs = list(dict.fromkeys((s, c if s.max_nodes else None) for s in shapes for c in budgets))
        if not self.configs:
            raise ValueError(f"no candidate (tree, budget) in trees={trees!r}, budgets={budgets!r}")
        self.cost_model, self.prior_acceptance = cost_model, prior_acceptance
        self.test_steps, self.set_steps, self.explore, self.max_tests = test_steps, set_steps, explore, max_tests
        self.margin, self.window, self.ema, self.prior_weight = margin, window, ema, prior_weight
        self.max_climbs, self.max_streak, self.max_backoff = max_climbs, max_streak, max_backoff
        self.streak, self.last_set = 0, None  # consecutive set phases of the same speculative config
        self.fallbacks = 0  # consecutive autoregressive set phases (across requests)
        self.accepted = [0.0, 0.0]  # drafted tokens accepted, steps that rejected one: decayed over steps (_alpha)
        self._times_by_rows: dict = {}  # rows bucket -> {config -> the last `window` step times (across requests)}
        self.times: dict = self._times_by_rows.setdefault(1, {})  # the current rows bucket's
        self.tokens: dict = {}  # config -> EMA tokens per step (across requests)
        self._runs: dict = {}  # verify bucket -> runs so far (the first two are not timed: compile, warm-up)
        self._ar_cfg = next(((s, c) for s, c in self.configs if s.max_nodes == 0), None)
        self.has_ar = self._ar_cfg is not None
        self._keys = {s: shape_key(s) for s, _ in self.configs}  # each shape's name in the trace

    # --- set-up ------------------------------------------------------------------------------------
    def bind(self, decoder) -> None:
        self.decoder = decoder
        if self.cost_model is None:
            from ..cost import CostModel

            try:
                self.cost_model = CostModel.analytic(decoder.eager_target)
            except ValueError:  # not a recognisable MoE: no prior beyond prior_acceptance
                self.cost_model = None

    def envelope(self):
        """A shape at least as large as every candidate (nodes, depth, fan-out): sizes the caches."""
        shapes = [s for s, _ in self.configs]
        nodes = max(s.max_nodes for s in shapes)
        depth = max(s.depth for s in shapes)
        top_k = max([s.top_k for s in shapes if isinstance(s, TreeSpec)]
                    + [nodes if isinstance(s, StaticTree) else 1 for s in shapes])
        return TreeSpec(nodes, depth, top_k) if nodes else as_tree_shape(0)

    @property
    def drafts(self) -> bool:
        return any(s.max_nodes for s, _ in self.configs)

    def drafts_within(self, steps: int) -> bool:
        """Whether any of the next `steps` steps may draft: False while an autoregressive set phase has at least that
        many steps left (a request of at most `steps` steps then needs no drafter: no draft prefill, no catch-up)."""
        return self.drafts and not (self.phase == "set" and not self.current[0].max_nodes and self.left >= steps)

    def start(self) -> None:
        """A new request: a test phase first, or (when earlier requests measured the
        configs) the last request's set phase runs on (phases span requests, so short requests still get their
        tests), or a set phase of the best estimate."""
        self.req: dict = {}  # config -> [tokens, steps] this request
        self._after_ar = False  # the last step of this request was autoregressive (the drafter has tokens to catch up)
        if self.ar_time() is None or not any(c[0].max_nodes for c in self.times):
            self._plan(first=True)
        elif self.phase != "set" or self.left <= 0:  # else the set phase of the last request runs on
            self.queue, self.climbs = [], self.max_climbs  # earlier requests measured: set their best at once
            self._set()

    # --- estimates ---------------------------------------------------------------------------------
    def _ar(self):
        return self._ar_cfg

    def _predicted_ratio(self, cfg) -> float:
        """A config not measured yet: the slope of step-time ratio per verify token through the measured configs
        (a line through (1 token, ratio 1)), else the cost model's ratio."""
        from .buckets import DEFAULT_TREE_BUCKETS, pick_bucket

        buckets = getattr(getattr(self, "decoder", None), "tree_buckets", DEFAULT_TREE_BUCKETS)  # the pass sizes run
        base = self.ar_time()
        pts = [(pick_bucket(c[0].max_nodes + 1, buckets), self.step_time(c) / base)
               for c in self.times if c[0].max_nodes and c[1] == cfg[1]] if base else []
        if pts:
            slope = max(sum((n - 1) * (r - 1) for n, r in pts) / sum((n - 1) ** 2 for n, _ in pts), 0.0)
            return 1.0 + slope * (pick_bucket(cfg[0].max_nodes + 1, buckets) - 1)
        cm = self.cost_model
        if cm is None:
            return 1.0 + cfg[0].max_nodes / 4  # no model: assume a node costs a quarter of a step
        return cm.step_time(cfg[0], cfg[1]) / cm.step_time(0)

    def step_time(self, cfg) -> float | None:
        """Median of the config's last `window` measured steps (robust to a stray slow step)."""
        xs = self.times.get(cfg)
        return statistics.median(xs) if xs else None

    def ar_time(self) -> float | None:
        ar = self._ar()
        return self.step_time(ar) if ar else None

    def ratio(self, cfg) -> float:
        """Step time over the autoregressive step's: measured where both are, else the cost model's ratio."""
        t, base = self.step_time(cfg), self.ar_time()
        if t is not None and base:
            return t / base
        return self._predicted_ratio(cfg)

    def tokens_per_step(self, cfg) -> float:
        shape = cfg[0]
        if not shape.max_nodes:
            return 1.0
        alpha = self._alpha()
        if alpha is not None and isinstance(shape, TreeSpec) and shape.top_k == 1:
            return chain_tokens(alpha, shape.depth)  # a chain: the law at the acceptance of every recent step
        prior = self.tokens.get(cfg) if not self.req else None  # a new request: what this config got before
        if prior is None and alpha is not None and cfg not in self.req:
            prior = chain_tokens(alpha, min(shape.depth, shape.max_nodes))  # a tree not tried: the chain law
        prior = self.tokens.get(cfg) if prior is None else prior
        if prior is None:
            cm = self.cost_model
            prior = cm.tokens_per_step(shape, None if cm.alphas else self.prior_acceptance) if cm else \
                1.0 + self.prior_acceptance * min(shape.depth, shape.max_nodes)
        got, steps = self.req.get(cfg, (0, 0))
        if not steps:
            return prior
        w = self.prior_weight  # this request's steps, with the prior counting as prior_weight steps
        return (got + w * prior) / (steps + w)

    def _alpha(self) -> float | None:
        """The acceptance per depth of recent speculative steps, across requests and configs: accepted drafted tokens
        / (accepted + steps that rejected one), the estimate of a constant per-depth acceptance (each step a path of
        accepted tokens ended by one rejection unless the whole depth was accepted), every step's weight decaying by
        ACCEPT_DECAY per later step. Pooled over configs, one step that accepted nothing (or all) moves it a little:
        a config's own few steps vary from 1 to depth + 1 tokens. None before the first speculative step."""
        a, r = self.accepted
        return min(a / (a + r), MAX_ALPHA) if a + r > 0 else None

    def utility(self, cfg) -> float:
        """tokens per step / step-time ratio, at most tokens per step (a pass of more tokens never costs less)."""
        tokens = self.tokens_per_step(cfg)
        return min(tokens / self.ratio(cfg), tokens)

    def promising(self, cfg) -> bool:
        """Worth testing: estimated utility >= explore, and some drafted tokens expected to be accepted."""
        return self.utility(cfg) >= self.explore and self.tokens_per_step(cfg) >= 1 + self.margin

    def best_possible(self, cfg) -> float:
        """Utility with every drafted token accepted: a config below 1 here can never pay."""
        return (1 + min(cfg[0].depth, cfg[0].max_nodes)) / self.ratio(cfg)

    # --- phases ------------------------------------------------------------------------------------
    def _plan(self, first: bool = False) -> None:
        """Start a test phase: the autoregressive step if its time is unknown, then the promising candidates."""
        spec = sorted((c for c in self.configs if c[0].max_nodes and self.best_possible(c) >= 1),
                      key=self.utility, reverse=True)
        queue = []
        if self.has_ar and self.ar_time() is None:
            queue.append((self._ar(), "test"))
        promising = [c for c in spec if self.promising(c)][: self.max_tests]
        queue += [(c, "test") for c in promising]
        if not promising and spec and (not first or not self.has_ar):
            queue.append((spec[0], "probe"))  # after a fall-back: one step of the best speculative config
        if not self.has_ar and not queue:
            queue.append((max(self.configs, key=self.utility), "test"))
        self.queue, self.left, self.phase, self.current, self.climbs = queue, 0, "test", None, 0
        self._advance()

    def _advance(self) -> None:
        if not self.queue and self.climbs < self.max_climbs:  # hill-climb: a config not tried yet may beat the best
            tried = [c for c in self.configs if c in self.req or not c[0].max_nodes]
            rest = [c for c in self.configs if c not in tried and self.best_possible(c) >= 1]
            if rest and tried:
                nxt = max(rest, key=self.utility)
                if self.utility(nxt) > max(self.utility(c) for c in tried) and self.promising(nxt):
                    self.queue.append((nxt, "test"))
                    self.climbs += 1
        if self.queue:
            self.current, self.phase = self.queue.pop(0)
            self.left = 1 if self.phase == "probe" else self.test_steps
            return
        self._set()

    def _set(self) -> None:
        """End of tests: the best config by estimated utility for a set phase (AR: doubling back-off)."""
        candidates = [c for c in self.configs if not c[0].max_nodes or c in self.req or c in self.times]
        best = max(candidates or self.configs, key=self.utility)
        if self.has_ar and (not best[0].max_nodes or self.utility(best) < 1 + self.margin):
            best = self._ar()
            self.left = self.set_steps * 2 ** min(self.fallbacks, self.max_backoff)
            self.fallbacks += 1
            self.streak = 0
        else:
            # the same speculative config won again: its set phase doubles (up to 2**max_streak), so a stable
            # choice is re-tested ever more rarely; a set config that stops paying still ends its phase early
            self.streak = self.streak + 1 if best == self.last_set else 0
            self.left = self.set_steps * 2 ** min(self.streak, self.max_streak)
            self.fallbacks = 0
        self.current, self.phase, self.last_set = best, "set", best

    def next(self):
        """(tree shape, budget) for the next step."""
        if self.left <= 0:
            if self.phase == "set":
                self._plan()
            else:
                self._advance()
        return self.current

    def observe(self, cfg, tokens: float, seconds: float, bucket, timed: bool = True) -> None:
        """A step of cfg emitted tokens (per live row) in seconds; bucket: the verify pass's (R, N, C) (its first run
        compiles); timed=False: the step's time is not the config's (see step), so it neither counts as a measured step
        nor ends a phase."""
        got = self.req.setdefault(cfg, [0, 0])
        got[0] += tokens
        got[1] += 1
        if cfg[0].max_nodes:
            drafted = max(tokens - 1.0, 0.0)  # accepted drafted tokens (per live row)
            rejected = 1.0 if drafted < min(cfg[0].depth, cfg[0].max_nodes) - 1e-6 else 0.0
            self.accepted = [ACCEPT_DECAY * self.accepted[0] + drafted, ACCEPT_DECAY * self.accepted[1] + rejected]
        old = self.tokens.get(cfg)
        self.tokens[cfg] = tokens if old is None else (1 - self.ema) * old + self.ema * tokens
        key = bucket
        self._runs[key] = self._runs.get(key, 0) + 1
        if self._runs[key] > 2 and timed:
            self.times[cfg] = (self.times.get(cfg, []) + [seconds])[-self.window :]
            self.left -= 1
        if self.phase == "probe" and self.left <= 0 and self.promising(cfg):
            self.queue.insert(0, (cfg, "test"))  # the probe looked worth it: test it properly
        elif self.phase == "test" and cfg in self.times and self.utility(cfg) < 0.5 * self.explore:
            self.left = 0  # clearly losing: stop testing it early
        elif self.phase == "set" and cfg[0].max_nodes and self.left > 0 and len(self.times.get(cfg, ())) >= 3 \
                and self.utility(cfg) < 1:
            self.left = 0  # the set config stopped paying (measured online): test again now
            self.streak, self.last_set = 0, None

    # --- the decoder's step ------------------------------------------------------------------------
    def step(self, decoder, sampling, generator, stats) -> int:
        """One decode step of every live row under the chosen config; records the decision in stats.decisions.
        Utility is per row (tokens each live row emitted); step times are kept per rows bucket (a pass of fewer rows
        costs less, for every config alike)."""
        self.times = self._times_by_rows.setdefault(decoder.cache.rows, {})
        cfg = self.next()
        if decoder.ranks is not None:  # the ranks of a sharded target take one rank's choice (speculative.ranks)
            cfg = decoder.ranks.agree(cfg, self.configs)
        shape, c = cfg
        rows = max(sum(decoder.live), 1)
        t0 = decoder._clock()
        emitted = decoder._step(shape, c, sampling, generator, stats)
        seconds = decoder._clock() - t0
        v = stats.verify[-1]
        phase = self.phase
        # not the config's steady cost: a first draft after autoregressive steps (it feeds the drafter what they
        # committed), an exact pass on a path the decoder is still measuring for this pass shape (FastestExact)
        catch_up = self._after_ar and shape.max_nodes > 0
        measuring = decoder.measuring
        self._after_ar = not shape.max_nodes
        self.observe(cfg, emitted / rows, seconds, (v.row_bucket, v.bucket, v.budget),
                     timed=not (catch_up or measuring))
        base = self.ar_time()
        stats.decisions.append(Decision(stats.steps - 1, self._keys[shape], c, phase, emitted, seconds,
                                        None if not base else emitted / rows / (seconds / base)))
        return emitted


def make_controller(tree, budget, min_budget, controller, target):
    """The decoder's controller for tree/budget "auto" (None when neither is "auto")."""
    if tree != "auto" and budget != "auto":
        if min_budget is not None or controller is not None:
            raise ValueError("min_budget= and controller= go with tree='auto' or budget='auto'")
        return None
    if controller is not None:
        if not isinstance(controller, Controller):
            raise ValueError(f"controller must be a msc.speculative.Controller, got {type(controller).__name__}")
        return controller
    if min_budget is not None and budget != "auto":
        raise ValueError("min_budget= goes with budget='auto'")
    if callable(budget):
        raise ValueError("tree='auto' takes budget None, an int, or 'auto' (not a schedule)")
    if budget == "auto":
        from ..cost import ModelShape

        if min_budget is not None and (isinstance(min_budget, bool) or not isinstance(min_budget, int)
                                       or min_budget < 1):
            raise ValueError(f"min_budget must be an int >= 1 or None, got {min_budget!r}")
        shape = ModelShape.from_model(target) if min_budget is not None else None
        budgets = auto_budgets(min_budget, shape.num_experts, shape.top_k) if shape else (None,)
    else:
        budgets = (budget,)
    trees = DEFAULT_TREES if tree == "auto" else (tree,)
    return Controller(trees=trees, budgets=budgets)
