"""The cost model: predicted time per decode step for a tree shape, a budget C and a batch size, and the speedup
over autoregressive decoding that follows from the drafter's acceptance.

target (+ drafter) --profile--> AR step, verify latency per (N, C), draft time per level, accept/host time,
experts per layer per pass size, per-depth acceptance, accepted length per shape --> CostModel (JSON, keyed by
model config, device, dtype) --> step_time(shape, C, B), tokens_per_step(shape), speedup(shape, C, B)

Legend: E experts, k top-k, L MoE layers, T tokens of a pass per row, B rows (batch), N(x) distinct experts per
layer for x tokens, C budget, g drafted tokens of a chain, alpha acceptance.

Verify time. Measured per (N, C) bucket where profiled (batch 1). Elsewhere the analytic model of bytes moved:
    bytes(T, C, B) = dense bytes + L * min(N(B*T), C) * bytes per expert
    N(x) = recorded mean distinct experts per layer (interpolated over pass sizes) or E * (1 - (1 - k/E)^x)
    t(T, C, B) = a + b * bytes + c * B*T      (a, b, c >= 0, least squares over the measured buckets;
                                               without any: a = c = 0, b = 1 / the measured memory bandwidth)
Acceptance (MoESD): a chain of g drafted tokens with per-depth acceptance alpha_1..alpha_g emits
    1 + sum_d prod_{i <= d} alpha_i tokens per step   (= (1 - alpha^(g+1)) / (1 - alpha) for one alpha);
a tree emits its measured accepted length, or the chain figure of its depth when not measured.
Speedup = tokens per step / (step time / AR step time): Cascade's utility; below 1 speculation loses.
Closed forms (sympy, from the same chain law): the break-even acceptance alpha* of a shape and budget, the root in
(0, 1] of 1 + a + ... + a^K = step time / AR step time; the best chain length, argmax of the model's speedup over K,
explained by the stationary point of (1 - a^(K+1)) / ((1 - a) (t0 + t1 K)) (a LambertW).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["CostModel", "ModelShape", "profile", "distinct_experts", "chain_tokens", "chain_acceptance", "shape_key",
           "measure_bandwidth"]


def distinct_experts(tokens: float, num_experts: int, top_k: int) -> float:
    """Expected distinct experts per layer for a pass of `tokens` tokens under independent uniform routing."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def chain_tokens(alphas, drafted: int) -> float:
    """Tokens per step (accepted + the bonus) of a chain of `drafted` tokens; alphas: per-depth acceptance
    (conditional on the depth before being accepted; the last value repeats), or one number."""
    alphas = [float(alphas)] if isinstance(alphas, int | float) else [float(a) for a in alphas] or [0.0]
    total, p = 1.0, 1.0
    for d in range(drafted):
        p *= alphas[min(d, len(alphas) - 1)]
        total += p
    return total


def _chain_law(a, drafted):
    """chain_tokens with one alpha as a sympy expression: sum_{d=0}^{drafted} a^d. An int `drafted` gives the
    polynomial 1 + a + ... + a^drafted; a symbolic one gives sympy's closed form of the sum, (1 - a^(drafted+1)) /
    (1 - a) (its a != 1 branch; a = 1 gives drafted + 1)."""
    import sympy

    d = sympy.Dummy("d", integer=True, nonnegative=True)
    law = sympy.summation(a**d, (d, 0, drafted))
    return law.args[-1].expr if isinstance(law, sympy.Piecewise) else law


def chain_acceptance(tokens: float, drafted: int) -> float | None:
    """The one per-depth acceptance alpha at which a chain of `drafted` tokens emits `tokens` per step: the inverse
    of chain_tokens, the root of 1 + a + ... + a^drafted - tokens. That polynomial increases on [0, 1] from
    1 - tokens to drafted + 1 - tokens, so for 1 < tokens <= drafted + 1 it has exactly one root in (0, 1], found by
    bisection to float precision (exact isolation, sympy's Poly.real_roots, took 150 s on one degree-16 case).
    0.0 when tokens <= 1 (any acceptance reaches it), None when tokens > drafted + 1 (not even alpha = 1 does).
    The controller reads a request's acceptance through it."""
    if tokens <= 1:
        return 0.0
    if tokens >= drafted + 1:
        return 1.0 if tokens == drafted + 1 else None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chain_tokens(mid, drafted) < tokens else (lo, mid)
    return (lo + hi) / 2


@functools.cache
def _chain_optimum():
    """The stationary points of S(K) = chain law / (t0 + t1 K) in K, solved once by sympy with a, t0, t1 symbolic:
    (a, t0, t1, K), S, and the candidates. sympy's solve returns the principal branch of LambertW only, whose root
    is the one below K = -1; every branch solves w e^w = x, so each candidate comes on branches 0 and -1."""
    import sympy

    a, t0, t1 = sympy.symbols("a t0 t1", positive=True)
    k = sympy.Symbol("K", real=True)
    s = _chain_law(a, k) / (t0 + t1 * k)
    found = sympy.solve(sympy.diff(s, k), k)
    cands = [f.replace(sympy.LambertW, lambda x, *_, b=b: sympy.LambertW(x, b)) for f in found for b in (0, -1)]
    return (a, t0, t1, k), s, cands


def shape_key(shape) -> str:
    """A tree shape as a short string: 'chain4', 'tree16-4-4', 'static6', 'ar'."""
    from .speculative.tree import StaticTree, TreeSpec, as_tree_shape

    shape = as_tree_shape(shape)
    if shape.max_nodes == 0:
        return "ar"
    if isinstance(shape, TreeSpec):
        if shape.top_k == 1 and shape.depth == shape.total_tokens:
            return f"chain{shape.total_tokens}"
        return f"tree{shape.total_tokens}-{shape.depth}-{shape.top_k}"
    assert isinstance(shape, StaticTree)
    return f"static{shape.max_nodes}"


def _depth(shape) -> int:
    return min(shape.depth, shape.max_nodes)


@dataclass
class ModelShape:
    """What the analytic model needs from the target: experts, MoE layers and bytes."""

    num_experts: int
    top_k: int
    moe_layers: int
    expert_bytes: int  # one expert of one layer
    dense_bytes: int  # everything else (attention, embeddings, head, norms, shared experts)

    @classmethod
    def from_model(cls, model) -> ModelShape:
        model = getattr(model, "_orig_mod", model)
        cfg = model.config.get_text_config(decoder=True)
        e = next((getattr(cfg, n) for n in ("num_local_experts", "num_experts", "n_routed_experts")
                  if getattr(cfg, n, None)), None)
        if not e or not getattr(cfg, "num_experts_per_tok", None):
            raise ValueError("the cost model needs a MoE target (config with num_experts and num_experts_per_tok)")
        expert, dense, layers = 0, 0, set()
        for name, p in model.named_parameters():
            nbytes = p.numel() * p.element_size()
            m = re.search(r"^(.*)\.experts\.", name)
            if m and "shared_expert" not in name:
                expert += nbytes
                layers.add(m.group(1))
            else:
                dense += nbytes
        if not layers:
            raise ValueError("no expert parameters (names with '.experts.') found in the target")
        return cls(int(e), int(cfg.num_experts_per_tok), len(layers), expert // (int(e) * len(layers)), dense)


@dataclass
class CostModel:
    """Predicted step times and speedups; built by :func:`profile` or from a model alone (analytic).

        cm = msc.profile(target, msc.ModelDrafter(draft))          # measured on this device
        cm.speedup(4), cm.speedup(msc.TreeSpec(16, 4, 4), budget=8), cm.step_time(4, batch=8)
        cm.save("profile.json"); msc.CostModel.load("profile.json", target)

    All times are seconds. verify: "N,C" -> seconds of one verify pass of N tokens under budget C ("N,exact"
    without one), batch 1. expert_counts: "T" -> mean distinct experts per layer of a T-token pass (recorded).
    alphas: per-depth acceptance of the drafter; accepted: shape key -> measured tokens per step."""

    model: ModelShape
    key: str = ""
    bandwidth: float | None = None  # bytes / s, measured
    ar_step: float | None = None  # one autoregressive step (target pass + host work)
    host_step: float = 0.0  # accept and loop work per step, outside the target and the drafter
    draft_level: float = 0.0  # drafter time per tree level
    verify: dict[str, float] = field(default_factory=dict)
    expert_counts: dict[str, float] = field(default_factory=dict)
    alphas: list[float] = field(default_factory=list)
    accepted: dict[str, float] = field(default_factory=dict)
    measured: dict[str, dict] = field(default_factory=dict)  # per profiled config: tokens/step, step time, speedup

    # --- building ----------------------------------------------------------------------------------
    @classmethod
    def analytic(cls, target, bandwidth: float | None = None) -> CostModel:
        """From the model's bytes alone (bandwidth: bytes/s; measured on the target's device when None)."""
        dev = next(getattr(target, "_orig_mod", target).parameters()).device
        return cls(ModelShape.from_model(target), key=model_key(target),
                   bandwidth=bandwidth or measure_bandwidth(dev))

    # --- predictions -------------------------------------------------------------------------------
    def experts(self, tokens: int, batch: int = 1, budget: int | None = None) -> float:
        """Distinct experts per layer a pass of `tokens` tokens per row over `batch` rows loads (at most C)."""
        x = tokens * batch
        n = self._recorded(x)
        if n is None:
            n = distinct_experts(x, self.model.num_experts, self.model.top_k)
        n = min(n, float(self.model.num_experts))
        return n if budget is None else min(n, float(max(budget, self.model.top_k)))

    def _recorded(self, x: int) -> float | None:
        """Recorded counts, linearly interpolated over pass sizes (None outside what was recorded)."""
        pts = sorted((int(t), n) for t, n in self.expert_counts.items())
        if not pts or x < pts[0][0] or x > pts[-1][0]:
            return None
        for (t0, n0), (t1, n1) in itertools.pairwise(pts):
            if t0 <= x <= t1:
                return n0 if t1 == t0 else n0 + (n1 - n0) * (x - t0) / (t1 - t0)
        return pts[0][1]

    def bytes_moved(self, tokens: int, budget: int | None = None, batch: int = 1) -> float:
        m = self.model
        return m.dense_bytes + m.moe_layers * self.experts(tokens, batch, budget) * m.expert_bytes

    def _coefficients(self) -> tuple[float, float, float]:
        """(a, b, c) of t = a + b * bytes + c * tokens, non-negative, least squares over the measured buckets."""
        rows = []
        for key, t in self.verify.items():
            n, c = key.split(",")
            n, c = int(n), None if c == "exact" else int(c)
            rows.append(([1.0, self.bytes_moved(n, c), float(n)], t))
        if not rows:
            if not self.bandwidth:
                raise ValueError("the cost model has neither measured verify passes nor a bandwidth")
            return 0.0, 1.0 / self.bandwidth, 0.0
        best = None
        for subset in [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]:
            x = torch.tensor([[f[i] for i in subset] for f, _ in rows], dtype=torch.float64)
            y = torch.tensor([t for _, t in rows], dtype=torch.float64)
            scale = x.abs().amax(0).clamp(min=1e-30)
            sol = torch.linalg.lstsq(x / scale, y[:, None]).solution[:, 0] / scale
            if (sol < 0).any():
                continue
            err = float(((x @ sol - y) ** 2).sum())
            if best is None or err < best[0] - 1e-18:
                coef = [0.0, 0.0, 0.0]
                for i, v in zip(subset, sol.tolist()):
                    coef[i] = v
                best = (err, coef)
        if best is None:
            return 0.0, 1.0 / self.bandwidth if self.bandwidth else 0.0, 0.0
        return tuple(best[1])

    def verify_time(self, tokens: int, budget: int | None = None, batch: int = 1) -> float:
        """One verify pass of `tokens` tokens per row under budget C: the measured time at that pass size, else the
        line between the nearest measured sizes around it (decoders run each tree shape at its own size), else the
        fitted bytes model."""
        if batch == 1:
            tag = "exact" if budget is None else str(budget)
            sizes = sorted(int(k.split(",")[0]) for k in self.verify if k.split(",")[1] == tag)
            if tokens in sizes:
                return self.verify[f"{tokens},{tag}"]
            below, above = [n for n in sizes if n < tokens], [n for n in sizes if n > tokens]
            if below and above:
                lo, hi = below[-1], above[0]
                t_lo, t_hi = self.verify[f"{lo},{tag}"], self.verify[f"{hi},{tag}"]
                return t_lo + (t_hi - t_lo) * (tokens - lo) / (hi - lo)
        a, b, c = self._coefficients()
        return a + b * self.bytes_moved(tokens, budget, batch) + c * tokens * batch

    def draft_time(self, shape) -> float:
        from .speculative.tree import as_tree_shape

        shape = as_tree_shape(shape)
        return self.draft_level * _depth(shape) if shape.max_nodes else 0.0

    def step_time(self, shape, budget: int | None = None, batch: int = 1) -> float:
        """Seconds per decode step: draft + verify of the tree (root included) + accept and host work."""
        from .speculative.tree import as_tree_shape

        shape = as_tree_shape(shape)
        if shape.max_nodes == 0 and budget is None and batch == 1 and self.ar_step:
            return self.ar_step
        return self.draft_time(shape) + self.verify_time(shape.max_nodes + 1, budget, batch) + self.host_step

    def tokens_per_step(self, shape, acceptance: float | None = None) -> float:
        """Tokens a step emits: the measured accepted length of this shape, else the chain formula over its depth
        (acceptance: one alpha for every depth, overriding what was measured)."""
        from .speculative.tree import as_tree_shape

        shape = as_tree_shape(shape)
        if shape.max_nodes == 0:
            return 1.0
        if acceptance is None and shape_key(shape) in self.accepted:
            return self.accepted[shape_key(shape)]
        alphas = acceptance if acceptance is not None else (self.alphas or [0.0])
        return chain_tokens(alphas, _depth(shape))

    def speedup(self, shape, budget: int | None = None, batch: int = 1, acceptance: float | None = None) -> float:
        """Tokens per second over autoregressive decoding's (same batch): Cascade's utility."""
        base = self.step_time(0, None, batch)
        return self.tokens_per_step(shape, acceptance) / (self.step_time(shape, budget, batch) / base)

    def break_even_acceptance(self, shape, budget: int | None = None, batch: int = 1) -> float | None:
        """The per-depth acceptance alpha* at which speedup(shape, budget, batch, acceptance=alpha*) == 1: one alpha
        for every depth, as tokens_per_step uses it, so tokens per step is the chain law over the shape's depth K
        (a tree too, as tokens_per_step has it without a measurement). With r = step_time(shape, budget, batch) /
        step_time(0, batch=batch), alpha* is the root of 1 + a + ... + a^K = r (chain_acceptance, sympy): exactly one
        in (0, 1] when 1 < r <= K + 1; 0.0 when r <= 1 (speculation pays at any acceptance); None when r > K + 1
        (it loses even at alpha = 1). A larger budget (more bytes moved) never lowers it."""
        from .speculative.tree import as_tree_shape

        shape = as_tree_shape(shape)
        r = self.step_time(shape, budget, batch) / self.step_time(0, None, batch)
        return chain_acceptance(r, _depth(shape) if shape.max_nodes else 0)

    def best_chain_length(self, budget: int | None = None, acceptance: float | None = None, max_len: int = 16,
                          batch: int = 1) -> tuple[int, float | None]:
        """(k, K*): k the chain length in 1..max_len of the highest speedup(k, budget, batch, acceptance) (the
        model's own, so exact for the model: its alphas, or one given acceptance); K* the continuous optimum that
        explains it. For K*, the step time is the line t0 + t1 K through the model's step times at k and k + 1 and
        the acceptance one alpha a (the given one, else the one whose chain law gives the model's tokens per step at
        k), so S(K) = (1 - a^(K+1)) / ((1 - a) (t0 + t1 K)) equals the model's speedup at k (up to the AR step);
        sympy solves dS/dK = 0: with c = -ln a and beta = 1 + c (t0 - t1) / t1,
            K* = (-beta - W_-1(-e^-beta)) / c - 1        (W_-1: LambertW's lower branch),
        a maximum, real for t0 > t1. When the step time is linear in K, k is K* rounded down or up. K* is None where
        S has no maximum (a = 0 or 1, t1 <= 0, t0 <= t1: S only falls or only rises) or sympy finds none."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        best = max(range(1, max_len + 1), key=lambda n: self.speedup(n, budget, batch, acceptance))
        a = acceptance if acceptance is not None else chain_acceptance(self.tokens_per_step(best), best)
        t_k, t_next = self.step_time(best, budget, batch), self.step_time(best + 1, budget, batch)
        t1 = t_next - t_k
        t0 = t_k - t1 * best
        if a is None or not 0 < a < 1 or t1 <= 0 or t0 <= 0:
            return best, None
        (sa, s0, s1, sk), s, cands = _chain_optimum()
        values = {sa: a, s0: t0 / t_k, s1: t1 / t_k}  # times scaled: the solution depends on t0 / t1 only
        gain = lambda x: complex(s.subs(values | {sk: x}).evalf())
        found = []
        for c in cands:
            x = complex(c.subs(values).evalf())
            if abs(x.imag) < 1e-9 * max(1.0, abs(x.real)) and x.real > -1:
                x = x.real
                if gain(x).real >= max(gain(x - 1e-3).real, gain(x + 1e-3).real):  # a maximum
                    found.append(x)
        return best, max(found, key=lambda x: gain(x).real) if found else None

    # --- storage -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        d = dict(d)
        d["model"] = ModelShape(**d["model"])
        return cls(**d)

    def save(self, path) -> None:
        """Store under this model's key in the JSON file at path (other keys kept)."""
        path = Path(path)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[self.key] = self.to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path, target=None, key: str | None = None) -> CostModel:
        """The profile stored for target (its config, device and dtype) or under key."""
        data = json.loads(Path(path).read_text())
        key = key or model_key(target)
        if key not in data:
            raise KeyError(f"no profile for {key} in {path} (has: {', '.join(data) or 'none'}); run `moespec profile`")
        return cls.from_dict(data[key])


def model_key(model) -> str:
    """'<config hash>|<device name>|<dtype>': a profile holds for this config on this device in this dtype."""
    model = getattr(model, "_orig_mod", model)
    cfg = model.config.to_dict()
    for drop in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        cfg.pop(drop, None)
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]
    p = next(model.parameters())
    return f"{cfg.get('model_type', 'model')}-{digest}|{device_name(p.device)}|{str(p.dtype).replace('torch.', '')}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def measure_bandwidth(device, megabytes: int = 64, repeats: int = 5) -> float:
    """Bytes per second of a streaming read (a sum over a large buffer), the median of `repeats`."""
    device = torch.device(device)
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats + 1):
        t0 = _sync_clock(device)
        x.sum()
        times.append(_sync_clock(device) - t0)
    return x.numel() * 4 / statistics.median(times[1:])


def _sync_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --- profiling ---------------------------------------------------------------------------------------

def _median_time(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        t0 = _sync_clock(device)
        fn()
        times.append(_sync_clock(device) - t0)
    return statistics.median(times)


@torch.no_grad()
def profile(target, drafter=None, prompts=None, trees=(0, 2, 4, (16, 4, 4)), budgets=(None,),
            sizes=(1, 2, 4, 8, 16, 32, 64), new_tokens: int = 32, repeats: int = 3, compile: bool = True,
            compile_options: dict | None = None, decoder=None) -> CostModel:
    """Measure a CostModel on the target's device: memory bandwidth; one verify pass per (N in sizes and each tree
    shape's own size, C in budgets) (median of repeats, experts per layer recorded); then greedy decoding of the
    prompts with each tree shape and budget (a warm-up run, then timed): AR step, draft time per level,
    accept/host time, accepted length per shape, per-depth acceptance from the deepest chain; each config's
    measured and predicted speedup goes to `measured`.

    trees: shapes (0 = autoregressive, K = a chain, (total, depth, top_k) = a TreeSpec); prompts: [1, L] or [L]
    tensors (default: two fixed prompts of 24 ids). decoder: a SpeculativeDecoder to profile (default: one made
    here with compile and compile_options)."""
    from .speculative import NgramDrafter, SpeculativeDecoder, TreeSpec
    from .speculative.accept import SamplingConfig
    from .speculative.tree import DraftTree, as_tree_shape

    eager = getattr(target, "_orig_mod", target)
    dev = next(eager.parameters()).device
    vocab = eager.config.get_text_config(decoder=True).vocab_size
    shapes = [TreeSpec(*t) if isinstance(t, tuple) else as_tree_shape(t) for t in trees]
    if not any(s.max_nodes == 0 for s in shapes):
        shapes.insert(0, as_tree_shape(0))
    sizes = sorted(set(sizes) | {s.max_nodes + 1 for s in shapes})  # each shape's own pass size is timed too
    if prompts is None:
        prompts = [torch.tensor([(7 * i + 3 * j) % (vocab - 3) + 3 for i in range(24)]) for j in (1, 2)]
    prompts = [torch.as_tensor(p).reshape(1, -1).to(dev) for p in prompts]
    if decoder is None:
        decoder = SpeculativeDecoder(target, drafter=drafter or NgramDrafter(), tree=0, compile=compile,
                                     compile_options=compile_options or {"inner": "eager" if dev.type == "cpu"
                                                                         else "inductor"})
    for s in shapes:
        decoder.fit_pass_size(s)  # decoding verifies each shape at its own size: time that size
    cm = CostModel.analytic(target, measure_bandwidth(dev))

    # verify latency per (N, C): chains of real prompt tokens after the prompt as prefix
    ids = prompts[0]
    decoder.begin(ids, None, max(sizes) + 8, as_tree_shape(max(sizes)), SamplingConfig())
    flat = torch.cat([p[0] for p in prompts])
    for n in sizes:
        toks = [int(flat[i % flat.numel()]) for i in range(n)]
        tree = DraftTree.from_lists([(toks, [-1] + list(range(n - 1)))], dev)
        for c in budgets:
            decoder.verify(tree, c)  # warm-up (compiles the bucket once)
            if c is None:  # the timed passes are the ones decoding will run: the exact path kept for this size
                decoder.settle_exact(tree)
            run = lambda tree=tree, c=c: decoder.verify(tree, c)
            cm.verify[f"{n},{'exact' if c is None else c}"] = _median_time(run, repeats, dev)
        # counted in the moespec graph (an exact pass may run on the plain target, which records nothing)
        was, decoder.collect_expert_stats = decoder.collect_expert_stats, True
        one, decoder.exact_one = decoder.exact_one, None
        _, stat = decoder.verify(tree, None)
        decoder.collect_expert_stats, decoder.exact_one = was, one
        if stat.experts_per_layer:
            cm.expert_counts[str(n)] = statistics.fmean(stat.experts_per_layer.values())

    # decoding runs per (shape, budget)
    runs = {}
    for shape, c in itertools.product(shapes, budgets):
        if shape.max_nodes == 0 and c is not None:
            continue
        for p in prompts[:1]:
            decoder.generate(p, max_new_tokens=new_tokens, eos_token_id=None, tree=shape, budget=c)  # warm-up
        steps, toks, phases, per_step = 0, 0, {"draft": 0.0, "verify": 0.0, "accept": 0.0, "host": 0.0, "loop": 0.0}, []
        for p in prompts:
            t0 = _sync_clock(dev)
            out = decoder.generate(p, max_new_tokens=new_tokens, eos_token_id=None, tree=shape, budget=c)
            wall = _sync_clock(dev) - t0
            s = out.stats
            steps += s.steps
            toks += sum(s.accepted_per_step)
            per_step += s.accepted_per_step
            phases["draft"] += s.time_draft
            phases["verify"] += s.time_verify
            phases["accept"] += s.time_accept
            phases["host"] += s.time_host
            phases["loop"] += wall - s.time_total
        runs[(shape_key(shape), c)] = (shape, steps, toks, phases, per_step)

    _, ar_steps, _, ar_phases, _ = runs[("ar", None)]
    cm.ar_step = sum(ar_phases.values()) / ar_steps
    cm.host_step = (ar_phases["accept"] + ar_phases["host"] + ar_phases["loop"]) / ar_steps
    levels = [(ph["draft"], st * _depth(sh)) for (_, c), (sh, st, _, ph, _) in runs.items()
              if sh.max_nodes and c is None]
    cm.draft_level = sum(t for t, _ in levels) / max(sum(n for _, n in levels), 1)
    chains = [(sh, per) for (key, c), (sh, _, _, _, per) in runs.items() if c is None and key.startswith("chain")]
    if chains:
        sh, per = max(chains, key=lambda x: x[0].max_nodes)
        cm.alphas = per_depth_acceptance(per, _depth(sh))
    for (key, c), (sh, st, tk, _, _) in runs.items():
        if c is None and sh.max_nodes and not key.startswith("chain"):
            cm.accepted[key] = tk / st
    for (key, c), (sh, st, tk, ph, _) in runs.items():
        step = sum(ph.values()) / st
        cm.measured[f"{key},{'exact' if c is None else c}"] = {
            "tokens_per_step": round(tk / st, 4), "step_s": step,
            "speedup": (tk / st) / (step / cm.ar_step),
            "predicted_speedup": cm.speedup(sh, c), "predicted_step_s": cm.step_time(sh, c),
            "split_s": {k: v / st for k, v in ph.items()}}
    return cm


def per_depth_acceptance(accepted_per_step: list[int], drafted: int) -> list[float]:
    """alpha_d = P(depth d accepted | depth d-1 accepted), from a chain's tokens per step (bonus included)."""
    alphas = []
    for d in range(1, drafted + 1):
        reached = sum(1 for a in accepted_per_step if a - 1 >= d - 1)
        if not reached:
            break
        alphas.append(sum(1 for a in accepted_per_step if a - 1 >= d) / reached)
    return alphas
