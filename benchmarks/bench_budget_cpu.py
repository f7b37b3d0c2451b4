"""CPU benchmark: one 32-token verify pass of a 64-expert top-8 MoE (hidden 1024), compiled with the
moespec backend, without a budget and with budgets 8/16/32: median latency and experts per layer.

    python benchmarks/bench_budget_cpu.py [--layers 3] [--repeats 15]

Writes benchmarks/results/budget_cpu.json and prints a table. On the CPU the fused experts run the torch
implementation, which touches only the experts that received tokens, so latency follows the budget.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import moe_spec_compile as msc


def build(layers: int):
    cfg = transformers.Qwen3MoeConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2048,
                                      moe_intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
                                      num_key_value_heads=4, head_dim=128, num_experts=64, num_experts_per_tok=8,
                                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # trained routers are skewed; random ones are not: sharpen them
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(8.0)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "budget_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build(args.layers)
    x = torch.randint(0, 4096, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="moespec", options={"budget": None})
    rows = []
    with torch.no_grad():
        for budget in (None, 8, 16, 32):
            with msc.budget(budget):
                for _ in range(3):  # warm-up (the first call compiles)
                    compiled(x, use_cache=False)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    compiled(x, use_cache=False)
                    times.append((time.perf_counter() - t0) * 1e3)
                with msc.record_experts() as rec:
                    compiled(x, use_cache=False)
            per_layer = [len(ev.experts) for ev in rec.events]
            rows.append({"budget": budget, "median_ms": statistics.median(times),
                         "p10_ms": sorted(times)[len(times) // 10], "p90_ms": sorted(times)[(9 * len(times)) // 10],
                         "experts_per_layer": per_layer, "mean_experts": statistics.mean(per_layer)})
    base = rows[0]["median_ms"]
    print(f"{'budget':>8} {'median ms':>10} {'p10-p90 ms':>16} {'experts/layer':>14} {'vs exact':>9}")
    for r in rows:
        print(f"{str(r['budget']):>8} {r['median_ms']:>10.2f} {r['p10_ms']:>7.2f}-{r['p90_ms']:<8.2f} "
              f"{r['mean_experts']:>14.1f} {base / r['median_ms']:>8.2f}x")
    result = {
        "question": "CPU latency of a 32-token verify pass vs expert budget (64 experts, top-8, hidden 1024)",
        "device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_budget_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "layers": args.layers, "tokens": args.tokens, "repeats": args.repeats, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
