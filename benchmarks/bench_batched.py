"""Batched speculative decoding: tokens/s and expert traffic against batch size.

models (bundled pair, config-built) x batch sizes (1, 4, 16, 64) -> tokens/s of transformers' batched greedy
generate, moespec exact speculation and budgeted speculation -> distinct experts per MoE layer per verify
pass and per emitted token, next to the uniform-routing prediction N(T) = E (1 - (1 - k/E)^T)
-> benchmarks/results/batched_<device>[_quick].{json,md}

    python -P benchmarks/bench_batched.py            # CPU, both models, 32 new tokens, 3 repeats
    python -P benchmarks/bench_batched.py --quick    # about 5 minutes on 2 cores: 12 new tokens, 1 repeat

Prompts: left-padded slices of different lengths (12 to 24 tokens) of the bundled held-out text (bundled
pair) or of a random token stream (config-built pair; it drafts with the target itself by default, since its
random draft is never right: an acceptance upper bound). Every row generates max_new_tokens (no EOS), so
tokens/s compare like with like. The decoder is compiled by the moespec
backend (eager inner compiler on the CPU; budgets bind only in a compiled target); each configuration is
warmed up first, so compilation is not timed; expert counts come from a separate recorded run (recording
reads ids back to the host, so it is not timed). T in the expert table is the real tokens of a pass (live
rows x their tree nodes): under a budget padding does not vote, under exact routing padding tokens (dead
rows, padded nodes) still route to their own experts, so exact passes can load more than N(T).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

import moe_spec_compile as msc
from moe_spec_compile.commands.args import tree_arg
from moe_spec_compile.commands.generate import bundled
from moe_spec_compile.small_models import config_models

RESULTS = Path(__file__).parent / "results"


def experts_of(model) -> tuple[int, int]:
    cfg = model.config.get_text_config(decoder=True)
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name)), int(cfg.num_experts_per_tok)
    raise ValueError("no expert count in the target's config")


def uniform(e: int, k: int, t: float) -> float:
    """Distinct experts a layer loads for t tokens when each token picks k of E experts uniformly."""
    return e * (1 - (1 - k / e) ** t)


def prompts(stream: list[int], b: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """b left-padded rows, row i a slice of 12 + (5 i mod 13) tokens of the stream at its own offset."""
    lengths = [12 + (5 * i) % 13 for i in range(b)]
    width = max(lengths)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        start = (97 * i) % (len(stream) - n)
        ids[i, width - n :] = torch.tensor(stream[start : start + n])
        mask[i, width - n :] = 1
    return ids, mask


def timed(fn, repeats: int) -> tuple[float, float, float, object]:
    """(median, min, max) seconds of fn() over repeats runs after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times), out


def bench_model(args, name, target, draft, stream, pad_id) -> list[dict]:
    e, k = experts_of(target)
    n = args.max_new_tokens
    drafter = msc.ModelDrafter(target if name.startswith("config") and args.config_self_draft else draft)
    dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=args.tree, compile=True,
                                 compile_options={"inner": "eager"})
    budgets = [c for c in args.budgets if c < e]
    rows = []
    for b in args.batch_sizes:
        ids, mask = prompts(stream, b, pad_id)

        def hf(ids=ids, mask=mask):
            return target.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                   pad_token_id=pad_id)

        med, lo, hi, _ = timed(hf, args.repeats)
        plain = run_decoder(dec, ids, mask, n, 0, None)  # plain decoding through the same path: T = live rows
        rows.append({"model": name, "batch": b, "mode": "transformers generate (greedy, eager)", "budget": None,
                     "tok_s": b * n / med, "tok_s_range": [b * n / hi, b * n / lo], "tokens_per_step": 1.0,
                     **plain["experts"], "E": e, "k": k})
        for budget in [None, *budgets]:
            mode = "moespec speculative, exact" if budget is None else f"moespec speculative, C={budget}"

            def spec(budget=budget, ids=ids, mask=mask):
                return dec.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=None, budget=budget)

            dec.collect_expert_stats = False
            med, lo, hi, out = timed(spec, args.repeats)
            rec = run_decoder(dec, ids, mask, n, args.tree, budget)
            rows.append({"model": name, "batch": b, "mode": mode, "budget": budget, "tok_s": b * n / med,
                         "tok_s_range": [b * n / hi, b * n / lo],
                         "tokens_per_step": round(out.stats.tokens_per_step, 3),
                         "time_split_s": out.stats.summary()["time_s"], **rec["experts"], "E": e, "k": k})
        print(f"[{name}] batch {b}: " + ", ".join(f"{r['mode']} {r['tok_s']:.1f} tok/s"
                                                  for r in rows if r["batch"] == b), flush=True)
    return rows


def run_decoder(dec, ids, mask, n, tree, budget) -> dict:
    """One recorded run: distinct experts per layer per verify pass, real tokens per pass, tokens emitted."""
    dec.collect_expert_stats = True
    out = dec.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=None, tree=tree, budget=budget)
    dec.collect_expert_stats = False
    v = [x for x in out.stats.verify if x.experts_per_layer]
    per_pass = statistics.mean(statistics.mean(x.experts_per_layer.values()) for x in v)
    tokens = statistics.mean(getattr(x, "tokens", x.tree_size) for x in v)  # batch 1: VerifyStats
    emitted = sum(x.accepted for x in v) / len(v)
    return {"experts": {"real_tokens_per_pass": round(tokens, 2), "experts_per_pass": round(per_pass, 2),
                        "tokens_emitted_per_pass": round(emitted, 2),
                        "experts_per_token": round(per_pass / emitted, 3)}}


def write(args, env, rows) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"batched_{env['device_kind']}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
    lines = [f"# Batched speculative decoding ({env['device']})", "",
             f"{env['date']}; torch {env['torch']}, transformers {env['transformers']}; tree {env['tree']} "
             f"(ModelDrafter); {args.max_new_tokens} new tokens per row, greedy, no EOS; medians of "
             f"{args.repeats} runs [min, max]", "", f"command: `{env['command']}`", "",
             f"load (`uptime` before / after): `{env['uptime_before']}` / `{env['uptime_after']}`", ""]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        e, k = mine[0]["E"], mine[0]["k"]
        lines += [f"## {name} (E={e}, top-{k})", "",
                  "| batch | mode | tok/s [range] | tokens/step/row | real tokens/pass T | experts/layer/pass | "
                  "N(T) uniform | experts/layer/emitted token | uniform N(T)/emitted |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            t = r["real_tokens_per_pass"]
            pred = uniform(e, k, t)
            lines.append(f"| {r['batch']} | {r['mode']} | {r['tok_s']:.1f} [{r['tok_s_range'][0]:.1f}, "
                         f"{r['tok_s_range'][1]:.1f}] | {r['tokens_per_step']} | {t} | {r['experts_per_pass']} | "
                         f"{pred:.1f} | {r['experts_per_token']} | {pred / r['tokens_emitted_per_pass']:.3f} |")
        lines.append("")
    lines += ["The transformers rows take their expert counts from plain decoding through the decoder (tree=0, the "
              "same routing, T = batch rows per step). Budgets are capped at E - 1; a budgeted row's "
              "experts/layer/pass never exceeds C."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="12 new tokens, 1 repeat, one budget (about 5 min on 2 cores)")
    p.add_argument("--models", default="bundled,config", help="bundled and/or config (comma-separated)")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default="1,4,16,64")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (12 with --quick)")
    p.add_argument("--tree", type=tree_arg, default="3", help="K (a chain) or total,depth,top_k (default 3)")
    p.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="budgets C (default: 2k and 4k of the target, 2k only with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--config-draft", dest="config_self_draft", action="store_false",
                   help="config-built pair: draft with its random draft model (default: the target drafts for "
                        "itself: the acceptance upper bound, since a random draft is never right)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine OpenMP's spin-waiting threads can run "
                        "tens of times slower than one thread)")
    args = p.parse_args(argv)
    args.max_new_tokens = args.max_new_tokens or (12 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    uptime_before = _uptime()
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        if name == "bundled":
            got = bundled()
            if got is None:
                print("bundled pair missing: skipped")
                continue
            target, draft, tok = got
            from moe_spec_compile.tiny import heldout_text

            stream = tok(heldout_text())["input_ids"]
            label = "bundled pair"
        elif name == "config":
            target, draft = config_models()
            stream = torch.randint(1, target.config.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))
            stream = stream.tolist()
            label = ("config-built random Qwen3-MoE (4 layers, 32 experts, top-4, hidden 128), "
                     + ("self-drafted" if args.config_self_draft else "1-layer dense random draft"))
        else:
            raise SystemExit(f"unknown model {name!r}: bundled or config")
        if args.budgets is None:
            _, k = experts_of(target)
            args.budgets = [2 * k] if args.quick else [2 * k, 4 * k]
        pad_id = target.generation_config.pad_token_id or 0
        with torch.no_grad():
            rows += bench_model(args, label, target, draft, stream, pad_id)
        args.budgets = None if "--budgets" not in (argv or sys.argv) else args.budgets
    env = {"device": platform.processor() or "cpu", "device_kind": "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
           "tree": str(args.tree), "threads": torch.get_num_threads(),
           "command": "python -P benchmarks/bench_batched.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "uptime_before": uptime_before, "uptime_after": _uptime()}
    stem = write(args, env, rows)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "n/a"


if __name__ == "__main__":
    raise SystemExit(main())
