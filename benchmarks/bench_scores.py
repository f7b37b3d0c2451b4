"""Which expert score picks the budget set best? Held-out quality of the bundled target at equal budgets.

bundled target -> held-out 32-token windows, each one budgeted pass -> argmax agreement with the exact pass,
loss, accuracy, experts per layer; for each score ("prob", "topk", "top1", "prob" + a depth decay) and C
-> at C = E/4 also speculative decoding with the bundled draft (chain of 4, greedy, held-out prompts): mean
accepted length and greedy token agreement with the exact run, per score

    python -P benchmarks/bench_scores.py [--windows 48] [--prompts 4] [--out benchmarks/results/scores_cpu]

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
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts decoded per score at C = E/4 (0: none)")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per prompt")
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
    decode = _decode_rows(target, _draft, heldout, e // 4, args) if args.prompts else []
    meta = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M"), command="python -P " + " ".join(sys.argv),
                load_average=[round(x, 2) for x in (min(load), max(load))], experts=e,
                top_k=target.config.num_experts_per_tok, windows=args.windows, window=args.window)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, decode=decode), f, indent=1)
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
    if decode:
        lines += ["", f"Speculative decoding at C = {e // 4} (E/4): chain of 4 with the bundled draft, greedy, "
                  f"{args.prompts} held-out prompts of 48 tokens, {args.new_tokens} new tokens; agreement = new tokens "
                  "equal to the exact run's, by position.", "",
                  "| score | mean accepted length | vs exact | greedy agreement | experts/layer/verify |",
                  "|---|---|---|---|---|"]
        ref = decode[0]["mean_accepted"]
        for r in decode:
            lines.append(f"| {r['score']} | {r['mean_accepted']:.3f} | {100 * (r['mean_accepted'] / ref - 1):+.1f}% "
                         f"| {100 * r['agreement']:.1f}% | {r['verify_experts_per_layer'] or float('nan'):.2f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _decode_rows(target, draft, heldout: torch.Tensor, c: int, args) -> list[dict]:
    """Exact, then each score at budget c: mean accepted length and agreement with the exact tokens."""
    from moe_spec_compile.quality import greedy_agreement, speculative_run
    from moe_spec_compile.speculative import ModelDrafter, SpeculativeDecoder

    stride = heldout.numel() // (args.prompts + 1)
    prompts = [heldout[i * stride : i * stride + 48] for i in range(args.prompts)]
    dec = SpeculativeDecoder(target, drafter=ModelDrafter(draft), tree=4, compile=True,
                             compile_options={"inner": "eager"})
    exact, summary = speculative_run(dec, prompts, None, args.new_tokens)
    rows = [dict(score="exact", budget=None, agreement=1.0, **summary)]
    for score in ("prob", "topk", "top1"):
        with msc.budget(score=score):
            outs, summary = speculative_run(dec, prompts, c, args.new_tokens)
        rows.append(dict(score=score, budget=c, agreement=greedy_agreement(exact, outs), **summary))
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
