"""What a generate call reports: one VerifyStats per verify pass, GenerateStats over the call with a per-row view.

generate -> GenerateStats (.steps, .new_tokens, .tokens_per_step, .verify[i], .rows[b], phase times, decisions)

Legend: R rows of a pass (a rows bucket), N padded nodes per row, C the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["VerifyStats", "RowStats", "GenerateStats"]


@dataclass
class VerifyStats:
    tree_size: int  # nodes of the widest row's tree, root included
    bucket: int  # N: the padded nodes per row
    budget: object  # the budget C this pass ran under, exactly as asked (None: exact)
    accepted: int = 0  # tokens all rows emitted in this pass (accepted drafted tokens + the bonus)
    experts_per_layer: dict[str, int] | None = None  # distinct experts each MoE block used (None: not recorded)
    budget_bound: bool | None = None  # some block used all the experts its budget allowed
    layer_budgets: dict[str, int | None] | None = None  # the C each block applied: C clamped to [k, E], None when
    #                                                     C >= E (exact); None: not recorded
    path: str = "moespec"  # the path that ran it: "moespec", or an exact pass's "plain" (the plain target) or
    #                        "batched_mm" (the plain target with transformers' batched_mm experts)
    rows: int = 1  # live rows verified in this pass
    row_bucket: int = 1  # R: rows the pass ran (live rows + padding rows)
    tokens: int = 0  # real tokens (live rows' tree nodes): the tokens that vote in the budget


@dataclass
class RowStats:
    """One sequence's figures: what a batch of one reports as a whole."""

    steps: int = 0  # verify passes this row took part in
    new_tokens: int = 0
    accepted_per_step: list[int] = field(default_factory=list)  # tokens emitted per step (bonus included)

    @property
    def tokens_per_step(self) -> float:
        return sum(self.accepted_per_step) / max(len(self.accepted_per_step), 1)


@dataclass
class GenerateStats:
    steps: int = 0  # verify passes (each covers every live row)
    new_tokens: int = 0  # over all rows
    accepted_per_step: list[int] = field(default_factory=list)  # tokens all rows emitted per step (bonus included)
    verify: list[VerifyStats] = field(default_factory=list)
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_accept: float = 0.0
    time_host: float = 0.0  # the loop's own work between the phases (stopping checks, bookkeeping, the controller)
    decisions: list = field(default_factory=list)  # tree="auto" / budget="auto": one controller.Decision per step
    rows: list[RowStats] = field(default_factory=list)  # per row, in input order

    @property
    def tokens_per_step(self) -> float:
        """Mean accepted length: tokens emitted per row and verify pass, bonus included."""
        if not self.rows:
            return sum(self.accepted_per_step) / max(len(self.accepted_per_step), 1)
        return sum(sum(r.accepted_per_step) for r in self.rows) / max(sum(r.steps for r in self.rows), 1)

    @property
    def buckets(self) -> list[tuple[int, int | None]]:
        """(tree bucket N, budget C) of the passes run."""
        return sorted({(v.bucket, v.budget) for v in self.verify}, key=lambda b: (b[0], b[1] or 0))

    @property
    def pass_shapes(self) -> list[tuple[int, int]]:
        """(rows bucket R, tree bucket N) of the passes run: one compiled graph (one CUDA graph) each."""
        return sorted({(v.row_bucket, v.bucket) for v in self.verify})

    @property
    def time_total(self) -> float:
        return self.time_prefill + self.time_draft + self.time_verify + self.time_accept + self.time_host

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

    def summary(self) -> dict:
        """Named, rounded figures: counts, tokens per row and verify pass (bonus included), tokens/s over the
        timed phases, experts per layer per verify pass and per emitted token, the share of passes where the
        budget bound, the time per phase in seconds (4 significant digits), and per row."""
        bound = [v.budget_bound for v in self.verify if v.budget_bound is not None]
        experts, per_token = self.experts_per_layer(), self.experts_per_token()
        total = self.time_total
        return {
            "rows": len(self.rows) or 1,
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "tokens_per_step": round(self.tokens_per_step, 3),
            "tokens_per_s": round(self.new_tokens / total, 2) if total > 0 else None,
            "experts_per_layer": None if experts is None else round(experts, 2),
            "experts_per_token": None if per_token is None else round(per_token, 3),
            "budget_bound_fraction": round(sum(bound) / len(bound), 3) if bound else None,
            "buckets": self.buckets,
            "time_s": {name: _sig(value) for name, value in (
                ("prefill", self.time_prefill), ("draft", self.time_draft), ("verify", self.time_verify),
                ("accept", self.time_accept), ("host", self.time_host), ("total", total))},
            "per_row": [{"new_tokens": r.new_tokens, "steps": r.steps, "tokens_per_step": round(r.tokens_per_step, 3)}
                        for r in self.rows],
        }

    def __str__(self) -> str:
        s = self.summary()
        rows = [
            ("new tokens", f"{s['new_tokens']} in {s['steps']} verify passes"
             + (f" over {s['rows']} rows" if s["rows"] > 1 else "")),
            ("tokens per pass", f"{s['tokens_per_step']:.2f} (accepted drafts + 1 bonus"
             + (", per row)" if s["rows"] > 1 else ")")),
            ("tokens/s", "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f} (prefill included)"),
            ("experts/layer", "not recorded" if s["experts_per_layer"] is None
             else f"{s['experts_per_layer']:.1f} per verify pass, {s['experts_per_token']:.2f} per emitted token"),
            ("budget bound", "-" if s["budget_bound_fraction"] is None
             else f"in {s['budget_bound_fraction']:.0%} of verify passes"),
            ("time (s)", "  ".join(f"{k} {v:.3g}" for k, v in s["time_s"].items())),
            ("buckets", ", ".join(f"{n} tokens C={'exact' if c is None else c}" for n, c in s["buckets"]) or "-"),
        ]
        return "\n".join(f"{name:<16} {value}" for name, value in rows)


def _sig(seconds: float) -> float:
    """4 significant digits: readable, and a positive time never rounds to 0."""
    return float(f"{seconds:.4g}")
