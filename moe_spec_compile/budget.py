"""Budgets as data: what each MoE layer may load on a pass, held in device tensors the ops read.

budget spec (int | {block: C} | [C per layer] | Coverage) -> per-slot tables on each device (C, share, cap)
-> moespec::budget_topk reads table[slot] on the device -> A = the experts ranked < C (no shape depends on C)

Legend: T tokens of the pass, E experts, k top-k, C budget, S slots (one per (MoE block, compile options)).

A slot is registered the first time a block runs (layers run in order, so slots follow layer order).
Its compile-time spec (``options={"budget": ...}``) is the base; ``with budget(...)`` overrides it for every
slot and writes the tables in place, so a captured CUDA graph or a compiled graph picks up the new budget
at its next replay without recompiling. Policy and max_budget_tokens stay host-side values (they choose
code paths; a captured graph keeps the policy it was captured with).
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from dataclasses import dataclass

import torch

__all__ = ["POLICIES", "BudgetConfig", "Coverage", "budget", "budget_set", "effective_budget", "validate_budget",
           "validate_budget_spec", "expert_stats", "reset_expert_stats", "token_weights", "SCORES", "DEFAULT_SCORE"]

POLICIES = ("substitute", "truncate")
MAX_SLOTS = 1024
MAX_TOKENS = 8192  # passes up to this many tokens can carry per-token weights (node weights of a draft tree)
SCORES = ("prob", "topk", "top1")
DEFAULT_SCORE = "topk"  # best measured on the bundled pair: benchmarks/results/scores_cpu.md
_UNSET = object()


@dataclass(frozen=True)
class Coverage:
    """Per layer and per pass: the fewest experts holding at least `share` of the pass's routing mass (at most
    max_budget, at least k). Coverage(1.0) is exact."""

    share: float
    max_budget: int | None = None

    def __post_init__(self):
        if isinstance(self.share, bool) or not isinstance(self.share, int | float) or not 0 < self.share <= 1:
            raise ValueError(f"Coverage share must be a number in (0, 1], got {self.share!r}")
        validate_budget(self.max_budget, "Coverage max_budget")


def validate_budget(value, name: str = "budget") -> int | None:
    """None, or an int >= 1. bool and float are refused (a float budget is almost always a mistake)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= 1 or None, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def validate_budget_spec(value, name: str = "budget"):
    """None, an int C >= 1, a dict {block name: C or None}, a list of C (or None) in layer order, or a Coverage."""
    if isinstance(value, Coverage) or value is None or isinstance(value, int):
        return value if isinstance(value, Coverage) else validate_budget(value, name)
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{name} dict keys must be block names (str), got {bad[0]!r}")
        return {k: validate_budget(v, f"{name}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [validate_budget(v, f"{name}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{name} must be None, an int, a dict {{block: C}}, a list in layer order or "
                     f"msc.Coverage(share), got {value!r} ({type(value).__name__})")


def validate_policy(value) -> str:
    if value not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {value!r}")
    return value


def validate_max_tokens(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_budget_tokens must be an int >= 1 or None, got {value!r}")
    return value


def validate_score(value) -> str:
    if value not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {value!r}")
    return value


@dataclass(frozen=True)
class BudgetConfig:
    """Compile-time budget of a graph: spec (see validate_budget_spec), policy, max_budget_tokens (passes
    with more tokens, e.g. prefill, stay exact) and the expert score ("topk", the default: summed routing
    weights of each token's own top-k; "prob": summed router probabilities; "top1": each token's top-1 expert
    first)."""

    budget: object = None
    policy: str = "substitute"
    max_budget_tokens: int | None = 256
    score: str = DEFAULT_SCORE

    def __post_init__(self):
        object.__setattr__(self, "budget", _freeze(validate_budget_spec(self.budget)))
        validate_policy(self.policy)
        validate_max_tokens(self.max_budget_tokens)
        validate_score(self.score)


def _freeze(spec):
    return tuple(sorted(spec.items())) if isinstance(spec, dict) else tuple(spec) if isinstance(spec, list) else spec


# --- the host-side part: policy and max_budget_tokens (a context stack per thread) ---------------------

class _State(threading.local):
    def __init__(self):
        self.stack: list[dict] = []


_state = _State()


@contextlib.contextmanager
def budget(c=_UNSET, policy: str | None = None, max_budget_tokens=_UNSET, score: str | None = None):
    """Override the compile-time budget at run time: ``with msc.budget(16, policy="truncate"): ...``.

    c: None (exact), an int, {block name: C}, a list in layer order, or msc.Coverage(share). Arguments left
    out keep the enclosing (or compile-time) value. The budget reaches the ops as device data: graphs
    already compiled or captured use it at their next run."""
    frame = {}
    if c is not _UNSET:
        frame["budget"] = _freeze(validate_budget_spec(c))
    if policy is not None:
        frame["policy"] = validate_policy(policy)
    if max_budget_tokens is not _UNSET:
        frame["max_budget_tokens"] = validate_max_tokens(max_budget_tokens)
    if score is not None:
        frame["score"] = validate_score(score)
    _state.stack.append(frame)
    try:
        if "budget" in frame:
            _tables.refresh()
        yield
    finally:
        _state.stack.pop()
        if "budget" in frame:
            _tables.refresh()


def _override():
    """The innermost run-time budget spec, or _UNSET."""
    for frame in reversed(_state.stack):
        if "budget" in frame:
            return frame["budget"]
    return _UNSET


def routing_values(policy: str, max_tokens: int | None, score: str) -> tuple[str, int | None, str]:
    """(policy, max_budget_tokens, score) in force: compile-time values, overridden by the enclosing
    ``with budget(...)`` frames (innermost wins)."""
    values = {"policy": policy, "max_budget_tokens": max_tokens, "score": score}
    for frame in _state.stack:
        values.update({k: v for k, v in frame.items() if k != "budget"})
    return values["policy"], values["max_budget_tokens"], values["score"]


def effective_budget(policy: str, max_tokens: int | None, score: str, num_tokens: int) -> tuple[bool, str, str]:
    """(budgeted, policy, score) for one pass, host-side; budgeted is False when the pass has more tokens than
    max_budget_tokens. Compile-time values, overridden by the enclosing ``with budget(...)`` frames."""
    policy, limit, score = routing_values(policy, max_tokens, score)
    return limit is None or num_tokens <= limit, policy, score


# --- the device part: per-slot tables ---------------------------------------------------------------------

def _resolve(spec, name: str, order: int):
    """(C, share, cap) of one slot for a spec: C 0 = exact; share 0 = no coverage; cap 0 = E."""
    if isinstance(spec, Coverage):
        if spec.share >= 1.0 and spec.max_budget is None:
            return 0, 0.0, 0  # all the mass: exact
        return 0, float(spec.share), spec.max_budget or 0
    if isinstance(spec, tuple) and spec and isinstance(spec[0], tuple):  # frozen dict
        c = dict(spec).get(name)
    elif isinstance(spec, tuple):  # frozen list in layer order
        c = spec[order] if order < len(spec) else None
    else:
        c = spec
    return (c or 0), 0.0, 0


class _Tables:
    """Slots and their device tables: c [S] int64, share [S] fp32, cap [S] int64, stats [S, 4] fp32."""

    def __init__(self):
        self.lock = threading.Lock()
        self.slots: dict[tuple[str, object], int] = {}  # (block name, compile-time spec) -> slot
        self.names: list[str] = []
        self.order: list[int] = []  # the slot's block's rank among its model's MoE blocks (layer order)
        self.ranks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {block name: rank}
        self.unrooted: dict[str, int] = {}  # the same for blocks whose model is unknown ("<op>", a bare graph)
        self.base: list[object] = []
        self.devices: dict[torch.device, dict[str, torch.Tensor]] = {}
        self.written: dict[torch.device, list] = {}  # per device: the (C, share, cap) rows its tables hold
        self.host_stats: dict[int, list[int]] = {}  # slot -> [passes, tokens] counted on the host (count_on_host)

    def slot(self, name: str, base, root: torch.nn.Module | None = None) -> int:
        """The slot of block `name` of model `root` under compile-time spec `base`. A list budget binds by the
        block's rank among its own model's MoE blocks (first runs in layer order), so models that share block names
        share a slot only where the rank agrees too (two instances of one architecture)."""
        with self.lock:
            ranks = self.unrooted if root is None else self.ranks.setdefault(root, {})
            order = ranks.setdefault(name, len(ranks))
            key = (name, base, order)
            if key not in self.slots:
                if len(self.names) >= MAX_SLOTS:
                    raise RuntimeError(f"moespec: more than {MAX_SLOTS} MoE blocks registered")
                self.order.append(order)
                self.slots[key] = len(self.names)
                self.names.append(name)
                self.base.append(base)
                self.refresh()
        return self.slots[key]

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        t = self.devices.get(device)
        if t is None:
            t = {"c": torch.zeros(MAX_SLOTS, dtype=torch.int64, device=device),
                 "tokens": torch.ones(MAX_TOKENS, dtype=torch.float32, device=device),
                 "share": torch.zeros(MAX_SLOTS, dtype=torch.float32, device=device),
                 "cap": torch.zeros(MAX_SLOTS, dtype=torch.int64, device=device),
                 "stats": torch.zeros(MAX_SLOTS, len(COUNTERS), dtype=torch.float32, device=device)}
            self.devices[device] = t
            self._write(t)
        return t

    def refresh(self) -> None:
        for t in self.devices.values():
            self._write(t)

    def _write(self, t) -> None:
        over = _override()
        rows = [_resolve(over if over is not _UNSET else base, name, order)
                for name, base, order in zip(self.names, self.base, self.order)]
        n = len(rows)
        dev = t["c"].device
        if not n or self.written.get(dev) == rows:  # unchanged (an exact pass after an exact pass): no copies
            return
        self.written[dev] = rows
        t["c"][:n].copy_(torch.tensor([r[0] for r in rows], dtype=torch.int64), non_blocking=dev.type == "cuda")
        t["share"][:n].copy_(torch.tensor([r[1] for r in rows], dtype=torch.float32))
        t["cap"][:n].copy_(torch.tensor([r[2] for r in rows], dtype=torch.int64))

    def mode(self, slot: int) -> str:
        """Host mirror of the slot's effective spec: "exact", "fixed" (a C) or "coverage" (fast paths when no graph
        is being captured; a capture always takes the general path, which reads everything on the device)."""
        over = _override()
        spec = over if over is not _UNSET else self.base[slot]
        c, share, _cap = _resolve(spec, self.names[slot], self.order[slot])
        return "coverage" if share > 0 else "fixed" if c > 0 else "exact"


_tables = _Tables()


_specs: list = []


def register_spec(spec) -> int:
    """An int id for a compile-time budget spec (op arguments are ints and strings)."""
    spec = _freeze(validate_budget_spec(spec))
    if spec not in _specs:
        _specs.append(spec)
    return _specs.index(spec)


def slot_of(name: str, spec_id: int, root: torch.nn.Module | None = None) -> int:
    return _tables.slot(name, _specs[spec_id], root)


def slot_name(slot: int) -> str:
    return _tables.names[slot]


@contextlib.contextmanager
def token_weights(weights: torch.Tensor):
    """Weigh each token of the passes run inside by weights [T] in the budget's expert scores (a draft tree's
    node probabilities, a depth decay; 0 excludes a token). Written in place: captured graphs see it."""
    if weights.dim() != 1 or weights.shape[0] > MAX_TOKENS:
        raise ValueError(f"token weights must be 1-D with at most {MAX_TOKENS} entries, got {tuple(weights.shape)}")
    buf = tables(weights.device)["tokens"]
    n = weights.shape[0]
    buf[:n].copy_(weights)
    try:
        yield
    finally:
        buf[:n].fill_(1.0)


def tables(device: torch.device) -> dict[str, torch.Tensor]:
    return _tables.on(device)


def slot_mode(slot: int) -> str:
    return _tables.mode(slot)


def count_on_host(slot: int, num_tokens: int) -> None:
    """Passes and tokens of an exact pass run outside any capture: host counters (two device ops fewer per pass)."""
    row = _tables.host_stats.setdefault(slot, [0, 0])
    row[0] += 1
    row[1] += num_tokens


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# The device counters per slot (tables' "stats" columns): budget size sums C over budgeted passes (0 for exact ones)
COUNTERS = ("passes", "tokens", "experts loaded", "budget bound", "budget size")


def pass_counts(before: torch.Tensor, after: torch.Tensor) -> list[tuple[str, int, int | None]]:
    """(block, experts loaded, C or None for exact) of each block that ran once between two copies of a device's
    counters (tables(device)["stats"]): per-pass statistics without recording the routing."""
    n = len(_tables.names)
    rows = (after[:n] - before[:n]).tolist()
    return [(_tables.names[i], round(r[2]), round(r[4]) or None) for i, r in enumerate(rows) if r[2] > 0]


def expert_stats() -> dict[str, dict]:
    """Per MoE block, from device counters that keep counting under CUDA-graph replay (read only here):
    passes, tokens, mean experts loaded per pass, and the share of passes where the budget bound."""
    out: dict[str, list[float]] = {}
    for slot, (passes, tokens) in list(_tables.host_stats.items()):
        acc = out.setdefault(_tables.names[slot], [0.0, 0.0, 0.0, 0.0])
        acc[0] += passes
        acc[1] += tokens
    for t in _tables.devices.values():
        rows = t["stats"][: len(_tables.names)].double().cpu().tolist()
        for name, row in zip(_tables.names, rows):
            acc = out.setdefault(name, [0.0, 0.0, 0.0, 0.0])
            for i in range(4):
                acc[i] += row[i]
    return {name: {"passes": int(p), "tokens": int(tok), "experts_per_pass": round(ex / p, 3) if p else None,
                   "bound_share": round(b / p, 3) if p else None}
            for name, (p, tok, ex, b) in sorted(out.items(), key=lambda kv: _natural(kv[0])) if p}


def reset_expert_stats() -> None:
    _tables.host_stats.clear()
    for t in _tables.devices.values():
        t["stats"].zero_()


# --- the budget set (plain torch) -----------------------------------------------------------------------

def budget_set(probs: torch.Tensor, c: int) -> torch.Tensor:
    """The budget set A as a bool mask [E]: the C experts with the highest summed probability (ties: lower index)."""
    return keep_top(expert_scores(probs), c)


def expert_scores(probs: torch.Tensor) -> torch.Tensor:
    """s_e = sum over the pass's tokens of each expert's router probability: [..., E] -> [E] fp32."""
    return probs.reshape(-1, probs.shape[-1]).float().sum(0)


def expert_ranks(scores: torch.Tensor) -> torch.Tensor:
    """rank[e] [E] int64: 0 for the highest score; a stable sort keeps equal scores in index order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))


def keep_top(scores: torch.Tensor, c) -> torch.Tensor:
    """Bool mask [E] of the C highest scores (C an int or a 0-d device tensor: no shape depends on it)."""
    return expert_ranks(scores) < c
