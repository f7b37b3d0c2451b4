"""How close do the Triton fused experts come to reading expert weights at copy bandwidth, and how much
faster are they than torch's grouped GEMM and transformers' experts implementations (grouped_mm,
batched_mm, the eager loop)?

model shape x T x budget C -> random budgeted routing -> median us per implementation (CUDA graphs where
they capture) -> expert-weight bytes / us against the measured copy bandwidth -> benchmarks/results/

    python benchmarks/bench_kernels.py                         # a GPU: every model shape, T, budget
    python benchmarks/bench_kernels.py --models qwen3-30b-a3b olmoe-1b-7b --tokens 1 16 64
    python benchmarks/bench_kernels.py --smoke                 # the CPU: tiny shapes under TRITON_INTERPRET=1

Legend: T tokens, E experts, k top-k, H hidden, I intermediate, C budget (experts a pass may load).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

import transformers  # noqa: E402
import triton  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

from moe_spec_compile.kernels.tune import MODEL_SHAPES, expert_weights, graphed, random_routing, time_us  # noqa: E402,E501
from moe_spec_compile.ops import fused_experts_torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = (1, 4, 16, 32, 64, 128, 256)
BASELINES = ("torch_grouped_mm", "grouped_mm", "batched_mm", "eager")
SMOKE_SHAPES = {"tiny": (8, 64, 32, 2, "silu", False), "tiny-gpt-oss": (8, 48, 32, 2, "swiglu_clamp", True)}


def copy_bandwidth(device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Bytes per microsecond of a device-to-device copy (read + write), the roofline for weight streaming."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = statistics.median(time_us(lambda: dst.copy_(src), reps=reps, warmup=3))
    return 2 * src.numel() / us


def baseline_module(e, h, i, gpt_oss, wgu, wd, bgu, bd):
    """transformers' experts module holding our weights (no copy): Qwen3-MoE's layout for the SiLU
    models (the same math as Mixtral's, OLMoE's and DeepSeek-V3's), GPT-OSS's own class for GPT-OSS."""
    if gpt_oss:
        cfg = transformers.GptOssConfig(hidden_size=h, intermediate_size=i, num_local_experts=e)
        with torch.device("meta"):
            mod = GptOssExperts(cfg)
        mod.gate_up_proj = torch.nn.Parameter(wgu.transpose(1, 2), requires_grad=False)  # [E, H, 2I] storage
        mod.down_proj = torch.nn.Parameter(wd.transpose(1, 2), requires_grad=False)  # [E, I, H]
        mod.gate_up_proj_bias = torch.nn.Parameter(bgu, requires_grad=False)
        mod.down_proj_bias = torch.nn.Parameter(bd, requires_grad=False)
    else:
        cfg = transformers.Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e, hidden_act="silu")
        with torch.device("meta"):
            mod = Qwen3MoeExperts(cfg)
        mod.gate_up_proj = torch.nn.Parameter(wgu, requires_grad=False)
        mod.down_proj = torch.nn.Parameter(wd, requires_grad=False)
    return mod.eval()


def grouped_mm_op():
    """torch's grouped GEMM (F.grouped_mm, else torch._grouped_mm), or None where this torch has neither."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _act(gate_up, activation: str, interleaved: bool, alpha: float = 1.702, limit: float = 7.0):
    """[n, 2I] -> [n, I]: silu(gate) * up, or GPT-OSS's clamped SwiGLU on interleaved rows. Written here
    rather than imported, so the baseline shares no code with what it is measured against."""
    gate, up = (gate_up[:, 0::2], gate_up[:, 1::2]) if interleaved else gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    if activation == "swiglu_clamp":
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"the torch grouped-GEMM baseline has no activation {activation!r}")


def torch_grouped_experts(x, ids, tw, wgu, wd, activation, bgu, bd, interleaved):
    """The experts on torch's grouped GEMM alone: sort (token, slot) pairs by expert -> grouped gate_up
    GEMM -> act -> grouped down GEMM -> weight and sum over slots. ids [T, k] must hold no -1 slot."""
    t, k = ids.shape
    e = wgu.shape[0]
    gmm = grouped_mm_op()
    flat = ids.reshape(-1).long()  # [T*k]
    order = torch.argsort(flat, stable=True)  # [T*k] pairs grouped by expert
    counts = torch.zeros(e, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] group ends (no host sync: capturable)
    xs = x[order // k]  # [T*k, H]
    gate_up = gmm(xs, wgu.transpose(1, 2), offs=offs)  # [T*k, 2I]
    if bgu is not None:
        gate_up = gate_up + bgu[flat[order]]
    act = _act(gate_up, activation, interleaved).to(x.dtype)  # [T*k, I]
    y = gmm(act, wd.transpose(1, 2), offs=offs)  # [T*k, H]
    if bd is not None:
        y = y + bd[flat[order]]
    y = y * tw.reshape(-1)[order, None]
    return torch.zeros_like(y).index_copy_(0, order, y).view(t, k, -1).sum(1)  # [T, H]


def _fits(t, k, h, i, elem, device) -> bool:
    """batched_mm gathers one weight copy per (token, slot): skip it where that cannot fit."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return t * k * 3 * h * i * elem < 0.6 * free


def bench_case(name, shape, t, c, dtype, device, reps, weights, check, baselines=BASELINES):
    """One (model, T, C) case: a row per implementation (median, p10, p90 us; bytes of the experts read).
    A baseline that is missing here or fails gets a row with `error` instead of timings."""
    e, h, i, k, activation, gpt_oss = shape
    wgu, wd, bgu, bd, module = weights
    gen = torch.Generator().manual_seed(t * 1000 + c)
    x = torch.randn(t, h, generator=gen).to(device=device, dtype=dtype)
    ids, tw = random_routing(t, k, e, c, gen, device)
    tw = tw.to(dtype)
    loaded = int(torch.unique(ids).numel())
    per_expert = (wgu.shape[1] * h + h * i) * wgu.element_size() + (
        (bgu.numel() + bd.numel()) // e * bgu.element_size() if bgu is not None else 0)
    weight_bytes = loaded * per_expert
    args = (x, ids, tw, wgu, wd, activation, bgu, bd, gpt_oss)
    impls = {"moespec": lambda: torch.ops.moespec.fused_experts(*args, impl="triton")}  # the public op
    errors = {}
    for impl in baselines:
        if impl == "batched_mm" and not _fits(t, k, h, i, wgu.element_size(), device):
            continue
        if impl == "torch_grouped_mm":
            if grouped_mm_op() is None:
                errors[impl] = "unavailable (no torch.nn.functional.grouped_mm or torch._grouped_mm)"
            else:
                impls[impl] = lambda: torch_grouped_experts(*args)
            continue

        def run(impl=impl):
            module.config._experts_implementation = impl
            return module(x, ids.long(), tw)

        impls[impl] = run
    ref = fused_experts_torch(*args).float() if check else None
    rows = []
    for impl, fn in impls.items():
        base = dict(model=name, T=t, k=k, C=c, E=e, H=h, I=i, impl=impl, experts_loaded=loaded,
                    weight_bytes=weight_bytes)
        try:
            with torch.no_grad():
                if ref is not None:
                    _check_close(fn(), ref, f"{name} T={t} C={c} {impl}")
                timed, mode = graphed(fn, device, try_graph=impl != "eager")  # the eager loop syncs on nonzero()
                us = time_us(timed, reps=reps, warmup=2)
        except Exception as err:  # ours failing is the finding; a baseline failing only loses its column
            if impl == "moespec":
                raise
            rows.append(dict(base, error=f"{type(err).__name__}: {err}"[:300]))
            continue
        med = statistics.median(us)
        rows.append(dict(base, mode=mode, median_us=med, p10_us=quantile(us, 0.1), p90_us=quantile(us, 0.9),
                         weight_bytes_per_us=weight_bytes / med))
    rows += [dict(model=name, T=t, k=k, C=c, E=e, H=h, I=i, impl=impl, error=msg) for impl, msg in errors.items()]
    return rows


def _check_close(out, ref, what):
    err = (out.float() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1e-6
    if err > 5e-2 * scale:
        raise AssertionError(f"{what}: max error {err:.3g} vs reference scale {scale:.3g}")


def quantile(xs, q):
    """The q-quantile of xs (nearest rank, no interpolation)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summarize(rows, copy_bw):
    """moespec rows gain the copy-bandwidth floor (us), the fraction of copy bandwidth achieved, the speedup
    over each baseline (> 1: ours faster) and ours / the best baseline's time (< 1: ours faster)."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["model"], r["T"], r["C"]), {})[r["impl"]] = r
    for impls in by_case.values():
        ours = impls["moespec"]
        ours["copy_floor_us"] = ours["weight_bytes"] / copy_bw
        ours["frac_copy_bw"] = ours["weight_bytes_per_us"] / copy_bw
        timed = {impl: r for impl, r in impls.items() if impl != "moespec" and "median_us" in r}
        for impl, r in timed.items():
            ours[f"speedup_vs_{impl}"] = r["median_us"] / ours["median_us"]
        if timed:
            best = min(timed, key=lambda impl: timed[impl]["median_us"])
            ours["best_torch"] = best
            ours["speedup_vs_best_torch"] = timed[best]["median_us"] / ours["median_us"]
            ours["time_ratio_to_best_torch"] = ours["median_us"] / timed[best]["median_us"]  # < 1: ours faster
    return by_case


def _markdown(by_case, meta) -> str:
    lines = [f"# bench_kernels: {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
             f"dtype {meta['dtype']}, copy bandwidth {meta['copy_bytes_per_us'] / 1e3:.0f} GB/s", "",
             *TABLE_HEADER]
    lines += [markdown_row(impls) for impls in by_case.values()]
    return "\n".join(lines) + "\n"


TABLE_HEADER = ("| model | T | C | experts | moespec us | copy floor us | % copy bw | torch grouped_mm us | "
                "grouped_mm us | batched_mm us | eager us | x best torch |", "|---" * 12 + "|")


def markdown_row(impls) -> str:
    """One case: ours, the floor, each baseline (us; '-' where absent or failed), ours vs the best."""
    ours = impls["moespec"]
    cell = lambda impl: f"{impls[impl]['median_us']:.1f}" if "median_us" in impls.get(impl, {}) else "-"
    best = ours.get("speedup_vs_best_torch")
    return (f"| {ours['model']} | {ours['T']} | {ours['C']} | {ours['experts_loaded']} | {ours['median_us']:.1f} | "
            f"{ours['copy_floor_us']:.1f} | {100 * ours['frac_copy_bw']:.0f} | {cell('torch_grouped_mm')} | "
            f"{cell('grouped_mm')} | {cell('batched_mm')} | {cell('eager')} | {f'{best:.2f}' if best else '-'} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--models", nargs="*", help=f"default: all of {sorted(MODEL_SHAPES)}")
    p.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    p.add_argument("--budgets", nargs="*", default=["k", "2k", "4k", "E"], help="C as k, 2k, 4k, E or a number")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against the torch reference")
    p.add_argument("--out", type=Path, help="results directory (default: benchmarks/results/; smoke: none)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_kernels: the model shapes need a CUDA GPU (the Triton interpreter would take days on them); "
              "run with --smoke for tiny shapes on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        shapes = SMOKE_SHAPES
        dtype = torch.float32 if not cuda else dtype  # bf16 is wrong under the interpreter
        tokens, reps = [t for t in args.tokens if t <= 4] or [1], min(args.reps, 3)
    else:
        shapes = {m: MODEL_SHAPES[m] for m in (args.models or MODEL_SHAPES)}
        tokens, reps = args.tokens, args.reps
    copy_bw = copy_bandwidth(device, nbytes=(1 << 30) if cuda else (1 << 24))
    rows = []
    for name, shape in shapes.items():
        e, h, i, k, _, gpt_oss = shape
        wgu, wd, bgu, bd = expert_weights(e, h, i, dtype, device, gpt_oss)
        weights = (wgu, wd, bgu, bd, baseline_module(e, h, i, gpt_oss, wgu, wd, bgu, bd))
        budgets = sorted({min(e, {"k": k, "2k": 2 * k, "4k": 4 * k, "E": e}.get(b) or int(b)) for b in args.budgets})
        for t in tokens:
            for c in budgets:
                case = bench_case(name, shape, t, c, dtype, device, reps, weights, check=not args.no_check)
                rows += case
                ours = case[0]
                print(f"{name:14s} T={t:4d} C={c:4d} experts={ours['experts_loaded']:4d} "
                      + " ".join(f"{r['impl']}={r['median_us']:.1f}us" for r in case if "median_us" in r), flush=True)
        del weights, wgu, wd, bgu, bd
        if cuda:
            torch.cuda.empty_cache()

    by_case = summarize(rows, copy_bw)
    meta = dict(device=torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or 'unknown'}), "
                "TRITON_INTERPRET=1", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                dtype=str(dtype).removeprefix("torch."), copy_bytes_per_us=copy_bw, smoke=args.smoke, reps=reps)
    print(_markdown(by_case, meta))
    out = args.out or (None if args.smoke else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = f"bench_kernels-{meta['device'].split(',')[0].replace(' ', '_')}-{meta['date'][:10]}"
        (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
        (out / f"{stem}.md").write_text(_markdown(by_case, meta))
        print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
