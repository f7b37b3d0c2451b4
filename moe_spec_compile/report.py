"""Readable summaries of what the experts did: recorded expert events -> named, rounded figures and a table.

rec.events (record_experts) -> summarize_events -> {"passes", "blocks", "by_block": {...}} -> format_summary

    with msc.record_experts() as rec:
        compiled(ids)
    print(format_summary(summarize_events(rec.events)))
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["summarize_events", "format_summary"]


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def summarize_events(events: Iterable) -> dict:
    """Per MoE block and overall: executions, tokens per execution, distinct experts per execution
    (mean, min, max), the budgets seen, and the share of executions that used all C experts allowed.

    events: ExpertEvent-like objects with .block, .num_tokens, .budget (None: exact) and .experts."""
    events = list(events)
    by_block: dict[str, dict] = {}
    for ev in events:
        b = by_block.setdefault(ev.block, {"executions": 0, "tokens": [], "experts": [], "budgets": set(),
                                           "bound": []})
        b["executions"] += 1
        b["tokens"].append(ev.num_tokens)
        b["experts"].append(len(ev.experts))
        b["budgets"].add(ev.budget)
        if ev.budget is not None:
            b["bound"].append(len(ev.experts) >= ev.budget)
    blocks = {name: _block_summary(b) for name, b in by_block.items()}
    experts = [len(ev.experts) for ev in events]
    bound = [len(ev.experts) >= ev.budget for ev in events if ev.budget is not None]
    return {
        "executions": len(events),
        "blocks": len(blocks),
        "mean_tokens": _mean([ev.num_tokens for ev in events]),
        "mean_experts": _mean(experts),
        "min_experts": min(experts) if experts else None,
        "max_experts": max(experts) if experts else None,
        "budget_bound_fraction": round(sum(bound) / len(bound), 3) if bound else None,
        "by_block": blocks,
    }


def _block_summary(b: dict) -> dict:
    budgets = sorted(b["budgets"], key=lambda c: (c is not None, c or 0))
    return {
        "executions": b["executions"],
        "mean_tokens": _mean(b["tokens"]),
        "mean_experts": _mean(b["experts"]),
        "min_experts": min(b["experts"]),
        "max_experts": max(b["experts"]),
        "budgets": budgets,
        "budget_bound_fraction": round(sum(b["bound"]) / len(b["bound"]), 3) if b["bound"] else None,
    }


def format_summary(summary: dict) -> str:
    """A short table: one row per block, then the totals."""
    head = ("block", "runs", "tokens/run", "experts/run", "min-max", "budget", "bound")

    def budgets(bs):
        return ",".join("exact" if c is None else str(c) for c in bs)

    def pct(x):
        return "-" if x is None else f"{x:.0%}"

    rows = [head] + [(name, str(b["executions"]), f"{b['mean_tokens']:.1f}", f"{b['mean_experts']:.1f}",
                      f"{b['min_experts']}-{b['max_experts']}", budgets(b["budgets"]), pct(b["budget_bound_fraction"]))
                     for name, b in summary["by_block"].items()]
    if summary["executions"]:
        rows.append(("all", str(summary["executions"]), f"{summary['mean_tokens']:.1f}",
                     f"{summary['mean_experts']:.1f}", f"{summary['min_experts']}-{summary['max_experts']}", "",
                     pct(summary["budget_bound_fraction"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
