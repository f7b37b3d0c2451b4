"""Record which experts each MoE block execution used.

budget_apply (every rewritten router) -> emit(block, T, C, ids) -> Recorder.events

Recording reads the ids back to the host, so it runs only inside ``with record_experts()``; it
sees nothing while a captured CUDA graph replays (Python does not run then): ``msc.expert_stats()`` reads
device counters that keep counting there.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch

__all__ = ["ExpertEvent", "Recorder", "record_experts"]


@dataclass(frozen=True)
class ExpertEvent:
    block: str  # the MoE block's module path, e.g. "model.layers.0.mlp"
    num_tokens: int
    budget: int | None  # the effective budget C of this pass, None when exact
    experts: tuple[int, ...]  # ids of the experts that got tokens, ascending
    compiled_as: str = ""  # the block name the graph was compiled for (differs when one graph serves many)
    loaded: tuple[int, ...] | None = None  # the experts whose weights this process read: `experts`, or under
    # expert parallelism (torchrun) the ones this rank holds; None is read as `experts`

    def __post_init__(self):
        if self.loaded is None:
            object.__setattr__(self, "loaded", self.experts)


@dataclass(eq=False)
class Recorder:
    events: list[ExpertEvent] = field(default_factory=list)

    def summary(self) -> dict:
        """Per block: executions, tokens, experts used (mean, max) and budgets (report.summarize_events)."""
        from .report import summarize_events

        return summarize_events(self.events)

    def __str__(self) -> str:
        from .report import format_summary

        return format_summary(self.summary())


class _Local(threading.local):
    def __init__(self):
        self.recorders: list[Recorder] = []


_local = _Local()


def active() -> bool:
    return bool(_local.recorders)


def emit(block: str, num_tokens: int, budget: int | None, ids: torch.Tensor, compiled_as: str = "",
         held: tuple[int, int] | None = None) -> None:
    """`held`: (first, count) of the experts this rank holds under expert parallelism, None when it holds all."""
    experts = tuple(sorted(set(ids.reshape(-1).tolist())))
    loaded = experts if held is None else tuple(e for e in experts if held[0] <= e < held[0] + held[1])
    event = ExpertEvent(block, int(num_tokens), budget, experts, compiled_as or block, loaded)
    for rec in _local.recorders:
        rec.events.append(event)


@contextlib.contextmanager
def record_experts():
    """``with msc.record_experts() as rec: model(x)`` -> ``rec.events``, one per MoE block execution."""
    rec = Recorder()
    _local.recorders.append(rec)
    try:
        yield rec
    finally:  # by identity: two recorders with equal events compare equal, so list.remove could take the wrong one
        _local.recorders[:] = [r for r in _local.recorders if r is not rec]
