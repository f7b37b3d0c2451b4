"""The GPU check in one command: every GPU test, kernel figure and end-to-end figure, each part time-boxed.

parts a..e -> run each under its deadline (a failure keeps its traceback, the rest still runs)
           -> one JSON + one Markdown table (device, versions, date, command) -> --out DIR
              (and benchmarks/results/gpu/ when run in the checkout, not for a dry run)

    python -P benchmarks/gpu_suite.py --out $OUT             # a lent GPU: < 9 min on one H100
    python -P benchmarks/gpu_suite.py --out /tmp/g --quick   # every sweep halved
    python -P benchmarks/gpu_suite.py --out /tmp/g --dry-run # the CPU: same code paths, tiny shapes, no graphs

a  the tests marked gpu (pytest in a subprocess: bf16 kernels, CUDA-graph replay, no host syncs)
b  fused_experts against torch's grouped GEMM and transformers' grouped_mm / batched_mm experts, and the
   copy-bandwidth floor (bytes of the experts read / measured copy bandwidth): OLMoE-1B-7B, Qwen3-30B-A3B,
   Mixtral-8x7B, GPT-OSS-20B expert shapes, T in 1..128, with and without a budget
c  the routing-metadata kernel alone at E = 256, T*k up to 4096
d  verify latency per (tree size, budget) and the AR step of a random-weight model built on the device from
   Qwen3-30B-A3B's config (2 layers): moespec (Triton kernels, CUDA graphs) against plain inductor
e  the bundled model: speculative tokens/s and accepted length against transformers' generate

The parts live in gpu_parts.py; this file runs them under their deadlines and writes the report.
Legend: T tokens, E experts, k top-k, N verify pass size, C budget. Timings: CUDA events (or synchronize +
perf_counter) after warm-up; medians with p10/p90.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

T0 = time.monotonic()  # the parts' deadlines count from here: imports and CUDA start-up included
DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_kernels, bench_speculative (-P keeps the script's folder off the path)

import torch  # noqa: E402
import transformers  # noqa: E402
import triton  # noqa: E402
from gpu_parts import PARTS, TITLES, Box, Sweeps  # noqa: E402

from moe_spec_compile.kernels import config as kconfig  # noqa: E402

__all__ = ["main", "run_part", "markdown", "PARTS", "BUDGET_S"]

CHECKOUT_RESULTS = HERE / "results" / "gpu"
# Seconds per part, 480 in all from process start, under the 9 minutes one device call allows. Part p must
# end by the sum of the budgets up to p: time a part leaves unused goes to the next, an overrun comes out of it.
# Sized by the first H200 run (2026-12-04): the GPU tests took ~150 s, part b 35 s, part c 3 s.
BUDGET_S = {"a": 150, "b": 60, "c": 15, "d": 170, "e": 85}
HARD_GRACE_S = 10  # a part still running this long past its deadline is interrupted (SIGALRM)


class PartTimeout(BaseException):
    """Raised by SIGALRM in a part past its budget + grace (a BaseException: sweeps' `except Exception` let it by)."""


# --- the runner --------------------------------------------------------------------------------------
def run_part(name: str, sw: Sweeps, deadline: float, fail: bool) -> dict:
    """One part under its box: ok | failed (errors or an exception, with the traceback) | timeout."""
    box = Box(deadline)
    t0 = time.monotonic()
    use_alarm = hasattr(signal, "SIGALRM")  # POSIX, main thread
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(max(1, int(box.left() + HARD_GRACE_S)))
    try:
        if fail:
            raise RuntimeError(f"part {name} failed on purpose (--fail-part {name})")
        result = PARTS[name](sw, box)
        status = "timeout" if result.get("timed_out") else "failed" if result.get("errors") else "ok"
    except PartTimeout:
        result, status = dict(box.partial, traceback=traceback.format_exc()), "timeout"
    except Exception:
        result, status = dict(traceback=traceback.format_exc()), "failed"
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    _settle(sw.device)
    result.update(status=status, seconds=round(time.monotonic() - t0, 1), budget_s=round(box.seconds, 1),
                  truncated=bool(result.get("skipped")))
    print(f"[{name}] {status} in {result['seconds']} s" + (" (truncated by its time box)" if result["truncated"]
                                                            else ""), flush=True)
    return result


def _on_alarm(signum, frame):
    raise PartTimeout("part ran past its budget + grace")


def _settle(device) -> None:
    """Between parts: no leftover compile caches or cached blocks."""
    gc.collect()  # decoders hold graph pools and caches in reference cycles
    torch._dynamo.reset()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:  # a broken context shows up in the next part's own result
            pass


def _meta(args, sw: Sweeps) -> dict:
    cuda = sw.device.type == "cuda"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:  # no git on the device
        commit = None
    return dict(device=torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or 'unknown'}), "
                "TRITON_INTERPRET=1 dry run", torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python -P benchmarks/gpu_suite.py " + " ".join(sys.argv[1:] if args.argv is None else
                                                                         args.argv),
                commit=commit, load_avg=os.getloadavg(), dtype=str(sw.dtype).removeprefix("torch."),
                quick=args.quick, dry_run=args.dry_run, budgets_s=BUDGET_S)


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"# GPU check: {m['device']}", "", f"{m['date']}; torch {m['torch']}, triton {m['triton']}, transformers "
             f"{m['transformers']}, CUDA {m['cuda']}, {m['dtype']}; commit {m['commit']}; load {m['load_avg']}", "",
             f"command: `{m['command']}`", "", "| part | what | status | seconds (box) | truncated |",
             "|---|---|---|---|---|"]
    parts = report["parts"]
    lines += [f"| {p} | {TITLES[p]} | {r['status']} | {r['seconds']} ({r['budget_s']}) | {r['truncated']} |"
              for p, r in parts.items()]
    for p, r in parts.items():
        lines += ["", f"## {p}: {TITLES[p]} ({r['status']})", ""]
        if p == "a" and "tests_passed" in r:
            lines.append(f"{r['tests_passed']} passed, {r['tests_failed']} failed, {r['tests_skipped']} skipped; "
                         f"files: {', '.join(r['files'])}")
        if p == "b" and "per_shape" in r:
            lines += [f"copy bandwidth {r['copy_bytes_per_us'] / 1e3:.3g} GB/s; tile configs: {r['tables']}", "",
                      "| shape | fused time / best torch, median [min, max] | % of copy bw, median [min, max] |",
                      "|---|---|---|"]
            lines += [f"| {s} | {_fmt_range(d['time_ratio_to_best_torch'], 1)} | {_fmt_range(d['frac_copy_bw'], 100)} |"
                      for s, d in r["per_shape"].items()]
            lines.append("")
        lines += r.get("markdown", [])
        lines += [f"- {e}" for e in r.get("errors", [])] + [f"- skipped (time box): {s}" for s in r.get("skipped", [])]
        for key in ("traceback", "first_traceback"):
            if key in r:
                lines += ["```", r[key].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _fmt_range(d, scale) -> str:
    return "-" if not d else f"{scale * d['median']:.3g} [{scale * d['min']:.3g}, {scale * d['max']:.3g}]"


def write(report: dict, dirs: list[Path]) -> None:
    m = report["meta"]
    stem = "gpu_suite_" + kconfig.device_name(torch.device("cuda" if not m["dry_run"] else "cpu")) + (
        "_quick" if m["quick"] else "") + ("_dry_run" if m["dry_run"] else "")
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (d / f"{stem}.md").write_text(markdown(report))
        print(f"wrote {d / stem}.json and .md")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results folder (the device's $OUT)")
    p.add_argument("--quick", action="store_true", help="halve every sweep")
    p.add_argument("--dry-run", action="store_true", help="the CPU: kernels under TRITON_INTERPRET=1, tiny shapes")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of a,b,c,d,e")
    p.add_argument("--budgets", default="", help="seconds per part, e.g. a=60,b=80 (the rest keep BUDGET_S): a "
                   "shorter check that leaves device time for a rerun")
    p.add_argument("--fail-part", default="", help=argparse.SUPPRESS)  # tests: that part raises at its start
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = argv
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"--parts: unknown part(s) {unknown}; expected a subset of {list(PARTS)}")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; use --dry-run to run the same code paths on the CPU", file=sys.stderr)
        return 2
    budgets = _budgets(args.budgets)
    sw = Sweeps.make(args.quick, args.dry_run)
    report = dict(meta=dict(_meta(args, sw), budgets_s=budgets), parts={})
    deadline = T0
    for name in parts:
        deadline += budgets[name]
        report["parts"][name] = run_part(name, sw, deadline, fail=name == args.fail_part)
        write(report, _dirs(args))  # after every part: a later crash keeps what ran
    print(markdown(report))
    return 0 if all(r["status"] == "ok" for r in report["parts"].values()) else 1


def _budgets(text: str) -> dict:
    """BUDGET_S with the parts named in text ("a=60,b=80") set to those seconds."""
    out = dict(BUDGET_S)
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, seconds = item.partition("=")
        if name not in BUDGET_S or not seconds.replace(".", "", 1).isdigit() or float(seconds) <= 0:
            raise ValueError(f"--budgets: {item!r} is not PART=SECONDS with PART in {list(BUDGET_S)}")
        out[name] = float(seconds)
    return out


def _dirs(args) -> list[Path]:
    """--out, and the checkout's benchmarks/results/gpu/ unless this is a dry run."""
    dirs = [args.out]
    if not args.dry_run and CHECKOUT_RESULTS.parent.is_dir() and CHECKOUT_RESULTS.resolve() != args.out.resolve():
        dirs.append(CHECKOUT_RESULTS)
    return dirs


if __name__ == "__main__":
    sys.exit(main())
