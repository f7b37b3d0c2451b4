"""Which expert score picks the budget set best? Held-out quality of the bundled target at equal budgets.

bundled target -> held-out 32-token windows, each one budgeted pass -> argmax agreement with the exact pass,
loss, accuracy, experts per layer; for each score ("prob", "topk", "top1", "prob" + a depth decay) and C

    python -P benchmarks/bench_scores.py [--windows 48] [--out benchmarks/results/scores_cpu]

Writes <out>.json and <out>.md with the machine, versions, date, command and load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import moe_spec_compile as msc
from moe_spec_compile.quality import score_windows

VARIANTS = [("prob", None), ("topk", None), ("top1", None), ("prob", 0.9), ("prob", 0.7)]


def _heldout(tok) -> torch.Tensor:
    from moe_spec_compile.tiny import heldout_text

    return torch.tensor(tok(heldout_text()).input_ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=48, help="held-out windows per row")
    p.add_argument("--window", type=int, default=32, help="tokens per window (one verify pass)")
    p.add_argument("--out", default="benchmarks/results/scores_cpu", help="output path without extension")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    target, _draft, tok = msc.load_tiny()
    e = target.config.num_experts
    heldout = _heldout(tok)
    compiled = torch.compile(target, backend="moespec", options={"max_budget_tokens": None, "inner": "eager"})
    budgets = sorted({e // 8, e // 4, 3 * e // 8, e // 2})
    exact = score_windows(target, heldout, args.window, None, max_windows=args.windows, compiled=compiled)
    rows = [dict(score="exact", decay=None, budget=None, loss=exact.loss, accuracy=exact.accuracy,
                 experts_per_layer=exact.experts_per_layer, agreement=1.0)]
    load = [os.getloadavg()[0]]
    for c in budgets:
        for score, decay in VARIANTS:
            t0 = time.perf_counter()
            s = score_windows(target, heldout, args.window, c, max_windows=args.windows, compiled=compiled,
                              score=score, decay=decay)
            rows.append(dict(score=score, decay=decay, budget=c, loss=s.loss, accuracy=s.accuracy,
                             experts_per_layer=s.experts_per_layer,
                             agreement=(s.predictions == exact.predictions).float().mean().item(),
                             seconds=time.perf_counter() - t0))
            load.append(os.getloadavg()[0])
            print(rows[-1], flush=True)
    meta = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M"), command="python -P " + " ".join(sys.argv),
                load_average=[round(x, 2) for x in (min(load), max(load))], experts=e,
                top_k=target.config.num_experts_per_tok, windows=args.windows, window=args.window)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# Expert scores for the budget set (bundled target, E={e}, k={meta['top_k']})", "",
             f"{meta['date']}, {meta['machine']} ({meta['cpus']} CPUs), torch {meta['torch']}, load "
             f"{meta['load_average'][0]}-{meta['load_average'][1]}; `{meta['command']}`", "",
             f"{args.windows} held-out windows of {args.window} tokens, each scored as one budgeted pass; agreement = "
             "positions whose argmax equals the exact pass's.", "",
             "| C | score | decay | experts/layer | argmax agreement | loss | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget'] or 'exact'} | {r['score']} | {r['decay'] or '-'} "
                     f"| {r['experts_per_layer']:.2f} "
                     f"| {100 * r['agreement']:.1f}% | {r['loss']:.3f} | {100 * r['accuracy']:.1f}% |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
