"""msc.explain(model, *example_args): which MoE blocks the backend finds, rewrites or declines, and why.

compile with the moespec backend (eager inner) -> run once under record_experts -> one row per block
"""

from __future__ import annotations

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
    """`moespec explain [--model PATH | --config NAME]`: the table of MoE blocks found, rewritten or declined."""
    import sys

    from .cli import check_device, config_class, model_dir, new_parser, positive_int, quiet_loading

    p = new_parser("moespec explain", "Which MoE blocks the moespec backend finds in a model, which it rewrites "
                   "(budgeted routing, fused experts) and why it declines the others.\n\n"
                   "    moespec explain                            # the bundled tiny target\n"
                   "    moespec explain --config DeepseekV3Config  # a small random model of that family\n"
                   "    moespec explain --model path/to/checkpoint --experts-implementation eager\n")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=model_dir, metavar="PATH", help="a local checkpoint directory "
                     "(default: the bundled tiny target)")
    src.add_argument("--config", type=config_class, metavar="NAME", help="a transformers config class name, e.g. "
                     "DeepseekV3Config: a small random model of that family")
    p.add_argument("--experts-implementation", choices=("grouped_mm", "batched_mm", "eager"), default=None,
                   help="transformers' experts implementation (default: the model's own)")
    p.add_argument("--tokens", type=positive_int, default=16, help="length of the random example input")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    check_device(p, args.device)
    model, source = _load_for_explain(args, quiet_loading)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
    print(f"explaining {source} on {args.tokens} random tokens", file=sys.stderr)
    try:
        report = explain(model.to(args.device), ids, use_cache=False)
    except Exception as exc:  # a model dynamo or the passes cannot handle: one line, not a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"moespec explain: could not compile and run {source}: {type(exc).__name__}: {first}",
              file=sys.stderr)
        return 1
    print(report.table())
    return 0


def _load_for_explain(args, quiet_loading):
    """(model, words saying what it is) for --model PATH, --config NAME, or the bundled target."""
    import transformers

    if args.config:
        from .small_models import build_small

        try:
            model = build_small(args.config, args.experts_implementation)
        except Exception as exc:
            raise SystemExit(f"moespec explain: cannot build a causal LM from {args.config}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        return model, f"a small random {args.config} model"
    kwargs = {} if args.experts_implementation is None else {"experts_implementation": args.experts_implementation}
    if args.model:
        with quiet_loading():
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, **kwargs)
        return model.eval(), f"the checkpoint in {args.model}"
    from .tiny import HERE

    with quiet_loading():
        model = transformers.AutoModelForCausalLM.from_pretrained(HERE / "target", local_files_only=True,
                                                                  dtype=torch.float32, **kwargs)
    return model.eval(), "the bundled tiny target (no --model or --config given)"
