"""Speculative decoding throughput and verify-pass latency per (tree size, budget) bucket.

model (bundled tiny, else config-built) -> tokens/s: autoregressive (transformers generate; the decoder
with tree=0), speculative without a budget and with budgets -> verify latency per bucket, eager and (on
CUDA) replayed CUDA graphs -> benchmarks/results/speculative_<device>.{json,md}

    python -P benchmarks/bench_speculative.py                 # CPU: eager inner compiler, short runs
    python -P benchmarks/bench_speculative.py --device cuda   # inductor + Triton kernels + CUDA graphs

Timings are medians over --repeats runs with [min, max]; each configuration is warmed up first (its
compilation and graph captures are not timed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import moe_spec_compile as msc
from moe_spec_compile.commands.args import tree_arg
from moe_spec_compile.commands.generate import bundled
from moe_spec_compile.small_models import config_models
from moe_spec_compile.speculative.accept import SamplingConfig
from moe_spec_compile.speculative.buckets import VerifyRunner
from moe_spec_compile.speculative.tree import TreeSpec
from moe_spec_compile.tiny import HERE as TINY

RESULTS = Path(__file__).parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device) -> tuple[float, float, float, object]:
    """(median, min, max) seconds of fn() over repeats runs after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times), out


def throughput(args, target, draft, prompt, device) -> list[dict]:
    """tok/s of transformers' generate, the decoder with tree=0, then every (tree, drafter) over budgets."""
    rows = [generate_row(args, target, prompt, device)]
    cases = [("autoregressive (decoder, tree=0)", 0, "none", [None])]
    for tree in args.trees:
        for drafter in args.drafters:
            cases.append(("speculative", tree, drafter, [None, *args.budgets]))
    for mode, tree, drafter_name, budgets in cases:
        rows += decoder_rows(args, target, draft, prompt, device, mode, tree, drafter_name, budgets)
    return rows


def generate_row(args, target, prompt, device) -> dict:
    """The baseline: transformers' generate, greedy, eager."""
    n = args.max_new_tokens

    def hf():
        return target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0)

    med, lo, hi, _ = timed(hf, args.repeats, device)
    return {"mode": "autoregressive (transformers generate, eager)", "tree": "-", "drafter": "-",
            "budget": None, "tok_s": n / med, "tok_s_range": [n / hi, n / lo], "tokens_per_step": 1.0}


def decoder_rows(args, target, draft, prompt, device, mode, tree, drafter_name, budgets) -> list[dict]:
    """One SpeculativeDecoder (compiled afresh), warmed up over every budget, then timed per budget."""
    n = args.max_new_tokens
    drafter = {"model": lambda: msc.ModelDrafter(draft), "ngram": lambda: msc.NgramDrafter(),
               "self": lambda: msc.ModelDrafter(target), "none": lambda: msc.NgramDrafter(),
               "eagle3": lambda: msc.Eagle3Drafter.from_pretrained(TINY / "eagle3", target)}[drafter_name]()
    torch._dynamo.reset()  # fresh compile caches: every decoder compiles the same forward
    dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=tree, compile=not args.no_compile,
                                 compile_options={"inner": args.inner}, collect_expert_stats=False)
    for c in budgets:  # warm-up over every budget: a dynamic tree meets new size buckets in later steps
        dec.generate(prompt, max_new_tokens=n, eos_token_id=None, budget=c)
    rows = []
    for c in budgets:
        run = lambda c=c, d=dec: d.generate(prompt, max_new_tokens=n, eos_token_id=None, budget=c)
        med, lo, hi, out = timed(run, args.repeats, device)
        s = out.stats
        rows.append({"mode": mode, "tree": str(tree), "drafter": drafter_name, "budget": c, "tok_s": n / med,
                     "tok_s_range": [n / hi, n / lo], "tokens_per_step": round(s.tokens_per_step, 3),
                     "time_split_s": {k: round(v, 4) for k, v in s.summary()["time_s"].items()}})
        print(f"{mode:<34} tree {str(tree):<38} {drafter_name:<6} budget {str(c):>4}: "
              f"{n / med:8.1f} tok/s  {s.tokens_per_step:.2f} tok/step", flush=True)
    return rows


def verify_latency(args, target, prompt, device) -> list[dict]:
    """One verify pass per (N, C) through the decoder's runner: eager call vs replayed graph (CUDA)."""
    rows = []
    torch._dynamo.reset()
    dec = msc.SpeculativeDecoder(target, drafter=msc.NgramDrafter(), tree=0, compile=not args.no_compile,
                                 compile_options={"inner": args.inner}, collect_expert_stats=False)
    dec.generate(prompt, max_new_tokens=2, eos_token_id=None)  # allocates the cache, prefix = prompt
    modes = [False] + ([True] if device.type == "cuda" else [])
    for size in args.sizes:
        dec.begin(prompt, None, 8, TreeSpec(size, size, 1), SamplingConfig())
        start = torch.tensor(dec.cache.lengths, device=device)
        tokens = torch.randint(0, 100, (1, size), device=device)
        pos = start[:, None] + torch.arange(size, device=device)
        mask = dec.masks.causal(size, start, dec.cache.pad)  # a chain: same cost as any tree of N nodes
        for c in [None, *args.budgets]:
            row = {"tree_size": size, "budget": c}
            for graphs in modes:
                runner = VerifyRunner(dec.verify_model, graphs, dec._cache_position)
                med, lo, hi, _ = timed(lambda r=runner, a=(dec.cache, tokens, pos, mask, pos, c): r(*a),
                                       args.repeats * 3, device)
                row["graph_ms" if graphs else "eager_ms"] = [round(1e3 * med, 3), round(1e3 * lo, 3),
                                                            round(1e3 * hi, 3)]
            rows.append(row)
            print(f"verify N={size:<4} C={str(c):>4}: eager {row['eager_ms'][0]:8.2f} ms"
                  + (f"  graph {row['graph_ms'][0]:8.2f} ms" if "graph_ms" in row else "  graph n/a (CPU)"), flush=True)
    return rows


def write(args, env, tput, lat) -> None:
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"speculative_{args.device.split(':')[0]}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "throughput": tput, "verify_latency": lat},
                                                    indent=1, default=str))
    lines = [f"# Speculative decoding benchmark ({env['device']})", "",
             f"{env['date']}; torch {env['torch']}, transformers {env['transformers']}; model: {env['model']}; "
             f"{args.max_new_tokens} new tokens, greedy; medians of {args.repeats} runs [min, max]", "",
             f"command: `{env['command']}`", "",
             "| mode | tree | drafter | budget | tok/s [range] | tokens/step | draft / verify / accept s |",
             "|---|---|---|---|---|---|---|"]
    for r in tput:
        split = r.get("time_split_s")
        split = f"{split['draft']:.3f} / {split['verify']:.3f} / {split['accept']:.3f}" if split else "-"
        lines.append(f"| {r['mode']} | {r['tree']} | {r['drafter']} | {r['budget']} | {r['tok_s']:.1f} "
                     f"[{r['tok_s_range'][0]:.1f}, {r['tok_s_range'][1]:.1f}] | {r['tokens_per_step']} | {split} |")
    lines += ["", "Verify pass latency per (tree size N, budget C) bucket, ms: median [min, max]", "",
              "| N | C | eager | CUDA graph |", "|---|---|---|---|"]
    for r in lat:
        g = r.get("graph_ms")
        lines.append(f"| {r['tree_size']} | {r['budget']} | {r['eager_ms'][0]} {r['eager_ms'][1:]} | "
                     f"{f'{g[0]} {g[1:]}' if g else 'n/a (CPU)'} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", action="store_true", help="config-built model even when the bundled one exists")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--trees", type=lambda s: [tree_arg(t) for t in s.split(";")], default="4;16,4,4")
    p.add_argument("--drafters", type=lambda s: s.split(","), default="ngram,model,self",
                   help="ngram; model (the draft model); self (the target drafts for itself: acceptance upper bound); "
                        "eagle3 (the bundled target's EAGLE-3 head)")
    p.add_argument("--budgets", type=lambda s: [int(b) for b in s.split(",")], default="4,8,16")
    p.add_argument("--sizes", type=lambda s: [int(b) for b in s.split(",")], default="8,16,32,64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner", default=None, help="backend inner compiler (default: inductor on CUDA, eager on CPU)")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.inner = args.inner or ("inductor" if device.type == "cuda" else "eager")
    if args.no_compile:
        args.budgets = []  # an uncompiled target cannot take a budget (the decoder refuses it)
    pair = None if args.config else bundled()
    if pair is None:
        target, draft = config_models()
        model = "config-built random Qwen3-MoE (4 layers, 32 experts, top-4, hidden 128) + 1-layer dense draft"
    else:
        target, draft, _ = pair
        model = "bundled tiny model"
    target, draft = target.to(device), draft.to(device)
    prompt = torch.tensor([[(7 * i) % 97 + 3 for i in range(24)]], device=device)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "model": model,
           "date": datetime.date.today().isoformat(), "inner": args.inner,
           "command": "python -P benchmarks/bench_speculative.py " + " ".join(argv or __import__("sys").argv[1:])}
    with torch.no_grad():
        tput = throughput(args, target, draft, prompt, device)
        lat = verify_latency(args, target, prompt, device)
    write(args, env, tput, lat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
