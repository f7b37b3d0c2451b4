"""The exact paths side by side in one run: decoders whose exact passes may take transformers' batched_mm experts
(the default: moespec graph, plain target, plain target with batched_mm) against the same decoders without that path
(moespec graph, plain target: the code before it), on the bundled target, greedy, per-step phase times.

one moespec compilation -> per config, an "old" decoder (FastestExact without the batched_mm path) and a "new" one
  -> warm-up (every pass shape settles its path) -> interleaved rounds -> tok/s, phase times per step, paths kept

    python -P benchmarks/bench_exact_paths.py                 # configs ar e5 d5 et, 3 prompts x 64 tokens, 3 rounds
    python -P benchmarks/bench_exact_paths.py ar e4 --rounds 5

Configs: ar (tree=0), e4/e5 (EAGLE-3 chains), d4/d5 (dense draft chains), et/dt (16-node trees 16-4-4). Ratios are
printed against both tree=0 rows; tokens are compared with the first row's. `uptime` before and after.
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch

import moe_spec_compile as msc
from moe_spec_compile.speculative.buckets import compile_pass
from moe_spec_compile.speculative.decoder import BATCHED
from moe_spec_compile.speculative.tree import TreeSpec
from moe_spec_compile.tiny import HERE, prompts_and_heldout


def uptime() -> str:
    return subprocess.run("uptime", capture_output=True, text=True).stdout.strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", default=["ar", "e5", "d5", "et"])
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    print(uptime(), flush=True)
    target, draft, tok = msc.load_tiny()
    verify = compile_pass(target, "moespec", options={"inner": "inductor", "max_budget_tokens": None})
    eagle = msc.Eagle3Drafter.from_pretrained(HERE / "eagle3", target, compile=True)
    dense = msc.ModelDrafter(draft, compile=True)
    tree16 = TreeSpec(16, 4, 4)
    known = {"ar": (msc.NgramDrafter(), 0), "e4": (eagle, 4), "e5": (eagle, 5), "d4": (dense, 4), "d5": (dense, 5),
             "et": (eagle, tree16), "dt": (dense, tree16)}
    if "ar" not in args.configs or any(c not in known for c in args.configs):
        p.error(f"configs must include ar and be among {sorted(known)}")
    decs = {}
    for name in args.configs:
        for version in ("old", "new"):
            drafter, tree = known[name]
            dec = decs[f"{version} {name}"] = msc.SpeculativeDecoder(verify, drafter=drafter, tree=tree)
            if version == "old":
                dec.exact_one.paths.pop(BATCHED)
    prompts = [q[None] for q in prompts_and_heldout(tok, args.prompts, 32)[0]]
    n = args.new_tokens
    for name, dec in decs.items():
        for _ in range(2):  # a shape settles its path after WARM + TIMED passes on each
            for q in prompts:
                dec.generate(q, max_new_tokens=n, eos_token_id=None)
        print(f"{name}: paths kept {dec.exact_one.choices}", flush=True)
    ref, res = None, {name: [] for name in decs}
    for r in range(args.rounds):
        for name, dec in decs.items():
            phases, steps, outs = dict.fromkeys(("draft", "verify", "accept", "host"), 0.0), 0, []
            t0 = time.perf_counter()
            for q in prompts:
                out = dec.generate(q, max_new_tokens=n, eos_token_id=None)
                for f in phases:
                    phases[f] += getattr(out.stats, "time_" + f)
                steps += out.stats.steps
                outs.append(out.sequences[0].tolist())
            res[name].append(n * len(prompts) / (time.perf_counter() - t0))
            ref = outs if ref is None else ref
            times = "  ".join(f"{f} {v / steps * 1e3:.2f}" for f, v in phases.items())
            print(f"{name:7s} round {r}: {res[name][-1]:6.1f} tok/s, {n * len(prompts) / steps:.2f} tokens/step, "
                  f"ms/step {times}, tokens {'same' if outs == ref else 'DIFFER'}", flush=True)
    for base in ("old ar", "new ar"):
        for name, v in res.items():
            per = [round(a / b, 2) for a, b in zip(v, res[base])]
            print(f"{name:7s} best {max(v):6.1f} tok/s, x {base} (best rounds) {max(v) / max(res[base]):.2f}, "
                  f"per round {per}")
    print(uptime())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
