"""Issue 23's targets side by side in one run: the shipped EAGLE-3 head against the bundled dense draft and against
moespec's own plain decoding (tree=0), on the bundled target, greedy, tokens compared with transformers' generate.

rows (one shared moespec compilation, drafters compiled as SpeculativeDecoder(compile=True) builds them)
  -> warm-up, then interleaved rounds (bench_peers.run_table) -> tok/s, accepted tokens per step
  -> benchmarks/results/eagle3_<device>.md (and .json)

    python -P benchmarks/bench_eagle3.py --quick      # 2 prompts x 32 tokens, 2 rounds
    python -P benchmarks/bench_eagle3.py              # 3 held-out prompts x 64 tokens, 5 rounds

Targets: accepted length with the head >= 1.25x the dense draft's at chain 4 and at a 16-node tree; the best
EAGLE-3 row >= 1.2x the best dense-draft row and >= 1.3x tree=0 in tok/s; under C = E/4 the head's accepted
length within 5% of exact. The machine's load is recorded before and after (`uptime`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import transformers

import moe_spec_compile as msc
from moe_spec_compile.commands.demo import warm_configs
from moe_spec_compile.speculative.tree import TreeSpec
from moe_spec_compile.tiny import HERE, prompts_and_heldout

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_peers (-P keeps the script's folder off the path)
from bench_peers import hf_row, run_table, same_tokens, say, shared_compile, uptime  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def decoder_row(dec, accepted: list):
    """bench_peers.decoder_row that also keeps each generate's accepted tokens per step in `accepted`."""
    def run(prompts, n):
        outs = []
        for p in prompts:
            out = dec.generate(p, max_new_tokens=n, eos_token_id=None)
            accepted.append(out.stats.tokens_per_step)
            outs.append(out.sequences[0, p.shape[1]:].tolist())
        return outs
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 prompts x 32 tokens, 2 rounds")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "eagle3_cpu.md"))
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.rounds = 2, 32, 2
    torch.set_grad_enabled(False)
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
           "command": "python -P benchmarks/bench_eagle3.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "uptime_before": uptime()}
    say(env["uptime_before"])
    target, draft, tok = msc.load_tiny()
    prompts = [q[None] for q in prompts_and_heldout(tok, args.prompts, 32)[0]]
    verify = shared_compile(target)
    quarter = max(target.config.num_experts // 4, target.config.num_experts_per_tok)
    dense = msc.ModelDrafter(draft, compile=True)
    eagle = msc.Eagle3Drafter.from_pretrained(HERE / "eagle3", target, compile=True)
    tree16 = TreeSpec(16, 4, 4)
    configs = {  # name -> (drafter, tree, budget)
        "moespec tree=0 (AR)": (msc.NgramDrafter(), 0, None),
        "chain 4, dense draft": (dense, 4, None),
        "chain 5, dense draft": (dense, 5, None),
        "tree 16-4-4, dense draft": (dense, tree16, None),
        "chain 3, EAGLE-3": (eagle, 3, None),
        "chain 4, EAGLE-3": (eagle, 4, None),
        "chain 5, EAGLE-3": (eagle, 5, None),
        "chain 6, EAGLE-3": (eagle, 6, None),
        "tree 16-4-4, EAGLE-3": (eagle, tree16, None),
        f"chain 4, EAGLE-3, C={quarter}": (eagle, 4, quarter),
        f"tree 16-4-4, EAGLE-3, C={quarter}": (eagle, tree16, quarter),
    }
    configs["auto, EAGLE-3"] = (eagle, "auto", None)
    accepted = {name: [] for name in configs}
    decoders = {name: msc.SpeculativeDecoder(verify, drafter=d, tree=t, budget=c)
                for name, (d, t, c) in configs.items()}
    warm_configs(decoders["auto, EAGLE-3"], prompts, args.new_tokens)  # no shape the controller picks compiles timed
    rows = {"transformers greedy generate": hf_row(target)}
    rows.update({name: decoder_row(d, accepted[name]) for name, d in decoders.items()})
    say(f"bundled target, {len(prompts)} prompts x {args.new_tokens} new tokens, {args.rounds} interleaved rounds")
    res = run_table(rows, prompts, args.new_tokens, args.rounds)
    hf, ar = res["transformers greedy generate"], res["moespec tree=0 (AR)"]
    acc = {name: statistics.mean(a) for name, a in accepted.items()}
    lines = ["| row | tok/s, median round [slowest-fastest] | x tree=0 | accepted tokens / step | tokens vs greedy "
             "generate |", "|---|---|---|---|---|"]
    for name, r in res.items():
        lo, hi = r["tok_s_range"]
        lines.append(f"| {name} | {r['tok_s']:.1f} [{lo:.1f}-{hi:.1f}] | {r['tok_s'] / ar['tok_s']:.2f}x | "
                     f"{acc[name]:.2f} | {same_tokens(r['outs'], hf['outs'])} |" if name in acc else
                     f"| {name} | {r['tok_s']:.1f} [{lo:.1f}-{hi:.1f}] | {r['tok_s'] / ar['tok_s']:.2f}x | 1 | - |")
    best_e = max((k for k in configs if "EAGLE" in k and "C=" not in k and "auto" not in k),
                 key=lambda k: res[k]["tok_s"])
    best_d = max((k for k in configs if "dense" in k), key=lambda k: res[k]["tok_s"])
    exact_ok = all(same_tokens(res[k]["outs"], hf["outs"]) == "identical" for k in configs if "C=" not in k)
    targets = [
        ("accepted length, EAGLE-3 / dense, chain 4 >= 1.25", acc["chain 4, EAGLE-3"] / acc["chain 4, dense draft"]),
        ("accepted length, EAGLE-3 / dense, 16-node tree >= 1.25",
         acc["tree 16-4-4, EAGLE-3"] / acc["tree 16-4-4, dense draft"]),
        (f"tok/s, best EAGLE-3 ({best_e}) / best dense ({best_d}) >= 1.2", res[best_e]["tok_s"] / res[best_d]["tok_s"]),
        (f"tok/s, best EAGLE-3 ({best_e}) / tree=0 >= 1.3", res[best_e]["tok_s"] / ar["tok_s"]),
        (f"accepted length at C = {quarter}, 16-node tree / exact >= 0.95",
         acc[f"tree 16-4-4, EAGLE-3, C={quarter}"] / acc["tree 16-4-4, EAGLE-3"]),
        (f"accepted length at C = {quarter}, chain 4 / exact >= 0.95",
         acc[f"chain 4, EAGLE-3, C={quarter}"] / acc["chain 4, EAGLE-3"]),
        (f"tok/s, auto with EAGLE-3 / the better of tree=0 and {best_e} >= 0.98 (issue 21)",
         res["auto, EAGLE-3"]["tok_s"] / max(ar["tok_s"], res[best_e]["tok_s"])),
    ]
    floors = [1.25, 1.25, 1.2, 1.3, 0.95, 0.95, 0.98]
    lines += ["", f"Exact rows' tokens identical to greedy generate: {'yes' if exact_ok else 'NO'}", "",
              "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {v:.2f} | {'yes' if v >= f else 'NO'} |" for (t, v), f in zip(targets, floors)]
    env["uptime_after"] = uptime()
    md = ["# Issue 23: the shipped EAGLE-3 head on the CPU (bench_eagle3.py)", "", *lines, "", "## Environment", "",
          *(f"- {k}: {v}" for k, v in env.items())]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n")
    report = {"env": env, "rows": {k: {kk: vv for kk, vv in r.items() if kk != "outs"} for k, r in res.items()},
              "accepted": accepted, "targets": [(t, v, v >= f) for (t, v), f in zip(targets, floors)],
              "exact_identical": exact_ok}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    say("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
