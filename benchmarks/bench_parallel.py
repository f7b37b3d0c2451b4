"""Issue 25's target: per-rank expert bytes per verify pass under a budget C with the experts split over W = 2
ranks (transformers' expert parallel plan, torchrun, gloo on the CPU), against one process under the same C; and
speculative tokens/s sharded and in one process (the CPU is not the point: correctness and bytes are).

    python benchmarks/bench_parallel.py [--out benchmarks/results/parallel_cpu.md] [--passes 24]

The script builds a config MoE (small_models.config_models: Qwen3-MoE, hidden 256, 64 experts top-8, 2 layers,
routers sharpened as trained ones are), saves it to a temporary directory and starts itself under torchrun (2 ranks,
one thread each); each rank runs verify-sized passes (16 random tokens) under each budget with msc.record_experts
and reports the experts of every pass it loaded (ExpertEvent.loaded: the experts of A it holds). One process runs
the same passes for the reference. Bytes = experts loaded x the bytes of one expert's weights (gate, up, down).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

N_TOKENS, BUDGETS, VOCAB = 16, (None, 32, 16, 8), 512
DRAFT_TOKENS = 48


def build(path: Path) -> None:
    from moe_spec_compile.small_models import config_models

    config_models(vocab=VOCAB, hidden=256, layers=2, experts=64, top_k=8)[0].save_pretrained(path)


def passes(model, n_passes: int) -> dict:
    """Experts loaded per (budget, pass, layer) and the time of all passes, on this process's model."""
    import moe_spec_compile as msc

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, VOCAB, (1, N_TOKENS), generator=gen) for _ in range(n_passes)]
    compiled = torch.compile(model, backend="moespec", options={"inner": "eager"})
    out = {}
    with torch.no_grad():
        for c in BUDGETS:
            with msc.budget(c):
                compiled(batches[0])  # compiles
                with msc.record_experts() as rec:
                    t0 = time.perf_counter()
                    for ids in batches:
                        compiled(ids)
                    seconds = time.perf_counter() - t0
            out[str(c)] = {"loaded": [len(e.loaded) for e in rec.events], "used": [len(e.experts) for e in rec.events],
                           "seconds": seconds}
    return out


def decode(model) -> dict:
    import moe_spec_compile as msc

    ids = torch.randint(1, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([ids, ids], dim=1)  # repeated text: the n-gram drafter has something to find
    dec = msc.SpeculativeDecoder(model, msc.NgramDrafter(), tree=4)
    dec.generate(ids, max_new_tokens=8, eos_token_id=None)  # warm-up
    t0 = time.perf_counter()
    out = dec.generate(ids, max_new_tokens=DRAFT_TOKENS, eos_token_id=None)
    return {"tok_s": DRAFT_TOKENS / (time.perf_counter() - t0), "tokens": out.sequences[0].tolist()}


def worker(path: str, out: str, n_passes: int) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from moe_spec_compile.distributed import distributed_config

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 distributed_config=distributed_config("ep", 2)).eval()
    res = {"passes": passes(model, n_passes), "decode": decode(model)}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def single(path: str, n_passes: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # as each rank
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return {"passes": passes(model, n_passes), "decode": decode(model)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/parallel_cpu.md")
    ap.add_argument("--passes", type=int, default=24)
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker, args.passes)
    import transformers

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp, "model"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}
        subprocess.run([sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        __file__, "--passes", str(args.passes), "--worker", str(Path(tmp, "model")), tmp],
                       env=env, check=True, capture_output=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
        one = single(str(Path(tmp, "model")), args.passes)
    load1 = os.getloadavg()
    h, i = 256, 128
    expert_bytes = 3 * h * i * 4
    lines = ["# Expert parallel (W = 2, torchrun, gloo) against one process: expert bytes per verify pass",
             "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}; "
             f"load {load0[0]:.2f} before, {load1[0]:.2f} after. "
             f"Command: `python benchmarks/bench_parallel.py --passes {args.passes}`.",
             "Model: Qwen3-MoE config, hidden 256, 64 experts top-8 (moe_intermediate 128, "
             f"{expert_bytes / 1e3:.0f} kB per expert in fp32), 2 layers, routers sharpened "
             "(small_models.config_models); "
             f"{args.passes} passes of {N_TOKENS} tokens per budget; layout \"ep\" (moe_spec_compile.distributed): 32 "
             "experts per rank; budgets applied with the same set A on both ranks (checked in tests/test_parallel.py).",
             "",
             "| C | one process: experts / layer / pass | rank 0 | rank 1 | rank 0 / one | rank 1 / one "
             "| max rank / one | bytes / pass, one process | max rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in map(str, BUDGETS):
        base = sum(one["passes"][c]["loaded"])
        per = [sum(r["passes"][c]["loaded"]) for r in ranks]
        n = len(one["passes"][c]["loaded"])
        worst = max(max(a, b) / max(o, 1) for a, b, o in zip(*(r["passes"][c]["loaded"] for r in ranks),
                                                              one["passes"][c]["loaded"]))
        lines.append(f"| {c if c != 'None' else 'exact'} | {base / n:.1f} | {per[0] / n:.1f} | {per[1] / n:.1f} | "
                     f"{per[0] / base:.2f}x | {per[1] / base:.2f}x | {max(per) / base:.2f}x (worst layer pass "
                     f"{worst:.2f}x) | {base / n * expert_bytes * 2 / 1e6:.2f} MB | "
                     f"{max(per) / n * expert_bytes * 2 / 1e6:.2f} MB |")
    same = all(r["decode"]["tokens"] == one["decode"]["tokens"] for r in ranks)
    lines += ["", "Bytes per pass count both layers. Speculative decoding (n-gram drafter, chain 4, greedy, "
              f"{DRAFT_TOKENS} new tokens, moespec target uncompiled): sharded "
              f"{ranks[0]['decode']['tok_s']:.1f} tok/s (2 processes, 1 thread each), one process "
              f"{one['decode']['tok_s']:.1f} tok/s (1 thread), identical tokens: {same}. On {os.cpu_count()} cores "
              "with gloo the collectives cost more than the halved expert work saves; the CPU is not the point here."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
