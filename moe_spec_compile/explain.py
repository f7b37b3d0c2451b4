"""msc.explain(model, *example_args): which MoE blocks the backend finds, rewrites or declines, and why.

compile with the moespec backend (eager inner) -> run once under record_experts -> one row per block
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field, replace

import torch

from .backend import collect_reports, moespec_backend
from .passes.pipeline import _ATTENTION
from .record import record_experts

__all__ = ["ExplainReport", "explain"]


@dataclass
class ExplainReport:
    blocks: list = field(default_factory=list)  # passes.BlockReport: name, num_experts, top_k, router, ...

    def table(self) -> str:
        head = ("block", "experts", "top-k", "router", "budgeted", "experts compute", "reason")
        rows = [head] + [(b.name, str(b.num_experts), str(b.top_k), b.router, "yes" if b.rewritten else "no",
                          b.experts, b.reason or "-") for b in self.blocks]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def explain(model: torch.nn.Module, *example_args, options: dict | None = None, **example_kwargs) -> ExplainReport:
    """Compile `model` with the moespec backend (inner eager) and run it once on the example inputs.

    A graph that dynamo reuses for several layers (after a graph break) is reported once per layer:
    the layers that ran are taken from the recorded expert events."""
    opts = {**(options or {}), "inner": "eager"}
    # A fresh backend object: dynamo must compile anew (a cached graph would report nothing).
    compiled = torch.compile(model, backend=functools.partial(moespec_backend, options=opts))
    with collect_reports() as reports, record_experts() as rec, torch.no_grad():
        compiled(*example_args, **example_kwargs)
    by_name = {r.name: r for r in reports}
    blocks = list(reports)
    for ev in rec.events:
        if ev.block not in by_name:
            twin = by_name.get(ev.compiled_as)
            if twin is not None:
                by_name[ev.block] = replace(twin, name=ev.block)
                blocks.append(by_name[ev.block])
    # A block whose experts ran in a graph of their own (a graph break) is reported by its router's graph.
    routed = {b.name for b in blocks if b.rewritten}
    blocks = [b for b in blocks if b.rewritten or b.name not in routed]
    blocks = [replace(b, router=b.router + " (attention heads)") if _ATTENTION.search(b.name) else b for b in blocks]
    return ExplainReport(sorted(blocks, key=lambda b: _natural(b.name)))


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.replace(".", " ").split()]


def main(argv=None) -> int:
    """`moespec explain --family qwen3_moe`: the table for a small config-built model."""
    import transformers

    p = argparse.ArgumentParser(prog="moespec explain")
    p.add_argument("--config", default="Qwen3MoeConfig", help="a transformers config class name")
    p.add_argument("--experts-implementation", default="grouped_mm")
    args = p.parse_args(argv)
    cfg = getattr(transformers, args.config)(vocab_size=128, hidden_size=64, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg._experts_implementation = args.experts_implementation
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    print(explain(model, torch.randint(0, 128, (1, 16))).table())
    return 0
