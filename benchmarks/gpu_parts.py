"""The GPU check's parts a..e (gpu_suite.py runs them): each takes the sweeps and a time box, and returns
what it measured as a dict (rows, errors, skipped points, a Markdown table).

Sweeps (device, quick or dry run) -> part(sw, box) -> {rows, errors, skipped, markdown, ...}

Legend: T tokens, E experts, k top-k, H hidden, I intermediate, N verify pass size, C budget.
Timings: CUDA events (or synchronize + perf_counter) after warm-up, CUDA-graph replays where they
capture; medians with p10/p90.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

import moe_spec_compile as msc
from moe_spec_compile.kernels import align_by_expert
from moe_spec_compile.kernels import config as kconfig
from moe_spec_compile.kernels.tune import MODEL_SHAPES, expert_weights, graphed, random_routing, time_us

# The parts import the benchmark scripts and anything past the public API themselves (_bench): an import
# broken by someone's refactor then fails that part alone.

__all__ = ["PARTS", "TITLES", "Sweeps", "Box", "RandomChainDrafter", "build_model"]

HERE = Path(__file__).resolve().parent
SUITE_SHAPES = ("olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-20b")
BASELINES = ("torch_grouped_mm", "grouped_mm", "batched_mm")  # transformers' eager loop: bench_kernels.py
# Qwen3-30B-A3B's config.json, less its 48 layers; the dry run scales it down to CPU size
QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                     vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     decoder_sparse_step=1, mlp_only_layers=[])
TINY_QWEN3_MOE = dict(QWEN3_30B_A3B, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                      vocab_size=256, max_position_embeddings=512)




@dataclass
class Sweeps:
    """What each part sweeps: the device run, --quick (every sweep halved) or --dry-run (the CPU)."""

    device: torch.device
    dtype: torch.dtype
    dry: bool
    shapes: tuple = SUITE_SHAPES  # b: MODEL_SHAPES names (the dry run: bench_kernels.SMOKE_SHAPES names)
    tokens: tuple = (1, 2, 4, 8, 16, 32, 64, 128)  # b: T
    reps: int = 50  # b, c: timed calls per point
    route_pairs: tuple = (8, 64, 256, 1024, 2048, 4096)  # c: T*k at E = 256, k = 8
    model: dict = field(default_factory=lambda: dict(QWEN3_30B_A3B))  # d
    model_name: str = "Qwen3-30B-A3B's config, random weights"
    layers: int = 2  # d
    sizes: tuple = (1, 16, 64, 4, 32, 8)  # d: verify pass sizes N, most wanted first (1: the AR step)
    budgets_k: tuple = (None, 1, 2, 4)  # d: budgets C as multiples of k (None: exact)
    new_tokens: int = 16  # d: tokens per timed generate
    repeats: int = 5  # d, e: timed runs per point
    inner: str = "inductor"  # moespec's inner compiler
    baseline: str = "inductor"  # the plain torch.compile backend d compares with
    e_trees: tuple = ((16, 4, 4),)  # e: msc.TreeSpec arguments, or an int K (a chain)
    e_eagle_trees: tuple = (4, (16, 4, 4))  # e: the shapes the shipped EAGLE-3 head drafts
    e_new_tokens: int = 64
    e_compile: bool = True  # e: the dry run leaves compiling through the decoder to d (one compile per case)

    @classmethod
    def make(cls, quick: bool, dry: bool) -> Sweeps:
        if dry:
            return cls(torch.device("cpu"), torch.float32, True, ("tiny", "tiny-gpt-oss"), tokens=(2,), reps=2,
                       route_pairs=(64,), model=dict(TINY_QWEN3_MOE), layers=1, sizes=(1, 4), budgets_k=(None, 1),
                       model_name="Qwen3-MoE config scaled to CPU size, random weights", new_tokens=3, repeats=1,
                       inner="eager", baseline="eager", e_trees=(4,), e_eagle_trees=(4,), e_new_tokens=4,
                       e_compile=False)
        sw = cls(torch.device("cuda"), torch.bfloat16, False)
        if quick:
            sw.tokens, sw.route_pairs = sw.tokens[::2], sw.route_pairs[1::2]
            sw.sizes, sw.budgets_k, sw.repeats, sw.e_new_tokens = sw.sizes[:3], (None, 2), 3, 32
        return sw


class Box:
    """A part's deadline (time.monotonic): sweeps check expired() between points and list what they skipped."""

    def __init__(self, deadline: float):
        self.deadline, self.start = deadline, time.monotonic()
        self.partial: dict = {}  # what a part measured so far: kept when SIGALRM stops it

    @property
    def seconds(self) -> float:
        return self.deadline - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0

    def share(self, pieces_left: int) -> Box:
        """A sub-box for the next of pieces_left pieces: an equal share of what is left."""
        return Box(time.monotonic() + max(self.left(), 0) / max(pieces_left, 1))


def _bench(name: str):
    """benchmarks/<name>.py as a module, imported when a part first needs it."""
    return importlib.import_module(name)


def _spread(xs: list[float], scale: float = 1.0) -> dict:
    """median, p10, p90 (deciles, interpolated; one sample: itself) of xs * scale."""
    xs = [scale * x for x in xs]
    q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else xs * 9
    return dict(median=statistics.median(xs), p10=q[0], p90=q[-1])


# --- a: the GPU tests --------------------------------------------------------------------------------
def part_a(sw: Sweeps, box: Box) -> dict:
    """pytest -m gpu over the test files that use the marker, in a subprocess bounded by the box."""
    root = HERE.parent
    if importlib.util.find_spec("pytest") is None:
        return dict(errors=["pytest is not installed for this python; `pip install pytest` where allowed"])
    files = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-P", "-m", "pytest", "-m", "gpu", "-o", "addopts=", "-v", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *files]
        try:
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=max(box.left(), 5))
        except subprocess.TimeoutExpired as err:  # no JUnit report: count the verbose lines printed so far
            out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
            counts = {f"tests_{k}": out.count(f" {k.upper()}") for k in ("passed", "failed", "skipped")}
            return dict(command=" ".join(cmd), files=files, timed_out=True, output_tail=out[-3000:], **counts,
                        errors=[f"pytest ran past its {box.seconds:.0f} s box", *_verbose_failures(out)])
        outcome = _junit(junit) if junit.is_file() else dict(passed=0, failed=0, skipped=0, failures=[])
    failed = outcome["failures"] + ([f"pytest exit code {proc.returncode}"] if proc.returncode not in (0, 5) else [])
    return dict(command=" ".join(cmd), files=files, returncode=proc.returncode, errors=failed,
                output_tail=proc.stdout[-3000:] + proc.stderr[-2000:],
                **{f"tests_{k}": outcome[k] for k in ("passed", "failed", "skipped")})


def _verbose_failures(out: str) -> list[str]:
    return [line.split(" FAILED")[0] + ": failed" for line in out.splitlines() if " FAILED" in line]


def _junit(path: Path) -> dict:
    """Counts and the failing tests (name: first line of the message) of a JUnit report."""
    out = dict(passed=0, failed=0, skipped=0, failures=[])
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            out["failed"] += 1
            out["failures"].append(f"{case.get('classname')}::{case.get('name')}: "
                                   f"{(bad.get('message') or '').splitlines()[0][:200] if bad.get('message') else ''}")
        elif case.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


# --- b: fused experts against torch's and transformers' experts, and the copy floor --------------------
def part_b(sw: Sweeps, box: Box) -> dict:
    """bench_kernels.bench_case per (shape, T, C), C = E (no budget) and 2k; ratios per case and per shape."""
    bench_kernels = _bench("bench_kernels")
    shapes = {name: (bench_kernels.SMOKE_SHAPES if sw.dry else MODEL_SHAPES)[name] for name in sw.shapes}
    device, cuda = sw.device, sw.device.type == "cuda"
    copy_bw = bench_kernels.copy_bandwidth(device, nbytes=(1 << 30) if cuda else (1 << 22))
    out = box.partial = dict(copy_bytes_per_us=copy_bw, tables={}, rows=[], skipped=[], errors=[])
    for index, (name, shape) in enumerate(shapes.items()):
        mine = box.share(len(shapes) - index)  # every shape gets its small T before any gets its large T
        if mine.expired():
            out["skipped"].append(name)
            continue
        e, h, i = shape[:3]
        out["tables"][name] = _table_source(e, h, i, sw.dtype, device)
        try:
            _bench_shape(bench_kernels, name, shape, sw, mine, out)
        except Exception as err:  # the weights or the baseline module: this shape only
            _error(out, f"{name}", err)
        if cuda:
            torch.cuda.empty_cache()
    cases = bench_kernels.summarize(out["rows"], copy_bw)
    return dict(out, per_shape=_per_shape(cases),
                markdown=[*bench_kernels.TABLE_HEADER, *(bench_kernels.markdown_row(c) for c in cases.values())])


def _bench_shape(bench_kernels, name, shape, sw: Sweeps, box: Box, out: dict) -> None:
    """One shape's (T, C) cases into out["rows"]; a failing case goes to out["errors"], the next one runs."""
    e, h, i, k, _, gpt_oss = shape
    wgu, wd, bgu, bd = expert_weights(e, h, i, sw.dtype, sw.device, gpt_oss)
    weights = (wgu, wd, bgu, bd, bench_kernels.baseline_module(e, h, i, gpt_oss, wgu, wd, bgu, bd))
    for t in sw.tokens:
        for c in sorted({e, min(e, 2 * k)}, reverse=True):
            if box.expired():
                out["skipped"].append(f"{name} T={t} C={c}")
                continue
            try:
                out["rows"] += bench_kernels.bench_case(name, shape, t, c, sw.dtype, sw.device, sw.reps, weights,
                                                        check=True, baselines=BASELINES)
            except Exception as err:
                _error(out, f"{name} T={t} C={c}", err)


def _error(out: dict, what: str, err: Exception) -> None:
    """A sweep point failed: one line in out["errors"]; the first failure's traceback in full."""
    out["errors"].append(f"{what}: {type(err).__name__}: {err}"[:500])
    out.setdefault("first_traceback", traceback.format_exc())


def _table_source(e, h, i, dtype, device) -> str:
    """Where the launcher's tile configs come from for this shape: a tuned table's file name, or the defaults."""
    path = kconfig.table_path(kconfig.device_name(device), e, h, i, dtype)
    return path.name if path.is_file() else "defaults (no tuned table for this device)"


def _per_shape(cases) -> dict:
    """Per shape, median, min and max over its cases of: fused_experts time / the best torch baseline's
    (< 1: ours faster) and achieved bandwidth / measured copy bandwidth."""
    out = {}
    for (model, _, _), impls in cases.items():
        ours = impls["moespec"]
        d = out.setdefault(model, {"time_ratio_to_best_torch": [], "frac_copy_bw": []})
        d["frac_copy_bw"].append(ours["frac_copy_bw"])
        if "time_ratio_to_best_torch" in ours:
            d["time_ratio_to_best_torch"].append(ours["time_ratio_to_best_torch"])
    return {m: {key: dict(median=statistics.median(v), min=min(v), max=max(v)) if v else None for key, v in d.items()}
            for m, d in out.items()}


# --- c: the routing-metadata kernel alone ------------------------------------------------------------
def part_c(sw: Sweeps, box: Box) -> dict:
    """align_by_expert at E = 256, k = 8 over T*k, BLOCK_M 16 and 64, checked, next to torch's stable argsort
    (the sort such metadata is otherwise built from). Replayed CUDA graphs on a GPU, so launch overhead
    does not hide the kernel."""
    e, k = 256, 8
    out = box.partial = dict(rows=[], skipped=[])
    for pairs in sw.route_pairs:
        t = pairs // k
        ids, _ = random_routing(t, k, e, e, torch.Generator().manual_seed(pairs), sw.device)
        for block_m in (16, 64):
            if box.expired():
                out["skipped"].append(f"T*k={pairs} BLOCK_M={block_m}")
                continue
            _check_meta(align_by_expert(ids, e, block_m), ids, e)
            ours, mode = graphed(lambda ids=ids, bm=block_m: align_by_expert(ids, e, bm), sw.device)
            ref, _ = graphed(lambda ids=ids: torch.argsort(ids.reshape(-1), stable=True), sw.device)
            us = _spread(time_us(ours, reps=sw.reps, warmup=3))
            out["rows"].append(dict(pairs=pairs, T=t, E=e, BLOCK_M=block_m, mode=mode, median_us=us["median"],
                                    p10_us=us["p10"], p90_us=us["p90"],
                                    torch_argsort_median_us=statistics.median(time_us(ref, reps=sw.reps, warmup=3))))
    return dict(out, markdown=["| T*k | BLOCK_M | kernel us [p10, p90] | torch argsort us | timed as |",
                               "|---|---|---|---|---|"] + [
        f"| {r['pairs']} | {r['BLOCK_M']} | {r['median_us']:.1f} [{r['p10_us']:.1f}, {r['p90_us']:.1f}] | "
        f"{r['torch_argsort_median_us']:.1f} | {r['mode']} |" for r in out["rows"]])


def _check_meta(meta, ids, e: int) -> None:
    """Every (token, slot) pair sits in exactly one padded row, under a tile labelled with its expert."""
    flat = ids.reshape(-1).long().cpu()
    rows = meta.sorted_pairs.long().cpu()
    tile_of_row = meta.tile_expert.long().cpu().repeat_interleave(meta.block_m)
    real = rows < flat.numel()
    if sorted(rows[real].tolist()) != list(range(flat.numel())):
        raise AssertionError("routing metadata: the pairs are not a permutation of 0..T*k-1")
    if not torch.equal(tile_of_row[real], flat[rows[real]]):
        raise AssertionError("routing metadata: a pair sits in a tile of another expert")
    if int(meta.num_padded.item()) % meta.block_m:
        raise AssertionError("routing metadata: padded rows not a multiple of BLOCK_M")


# --- d: verify latency per (N, C) and the AR step, moespec against plain inductor ----------------------
class RandomChainDrafter:
    """Drafts a chain of random tokens as long as the shape allows: every verify pass has exactly N tokens
    (a random draft is almost never accepted), which is what a latency sweep over N needs. A row drafter of
    moe_spec_compile/speculative/drafters.py (RowDrafter: start_row, draft_row, accept_row, skip_row)."""

    def __new__(cls, vocab_size: int, seed: int = 0):
        from moe_spec_compile.speculative import RowDrafter

        class _Random(RowDrafter):
            def __init__(self):
                self.vocab_size = vocab_size
                self.gen = torch.Generator().manual_seed(seed)

            def start_row(self, tokens):
                return None

            def draft_row(self, state, root, shape):
                n = min(shape.max_nodes, shape.depth)
                return [root] + torch.randint(0, self.vocab_size, (n,), generator=self.gen).tolist(), \
                    [-1] + list(range(n))

            def accept_row(self, state, tokens):
                pass

            def skip_row(self, state, root):
                pass

        return _Random()


def build_model(spec: dict, layers: int, device, dtype):
    """A random-weight Qwen3-MoE from a real config with fewer layers, built on the device."""
    cfg = transformers.Qwen3MoeConfig(**spec, num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def part_d(sw: Sweeps, box: Box) -> dict:
    """Per N (a chain of N-1 random drafts; N = 1 is the AR step) and C: ms per verify pass through
    msc.SpeculativeDecoder, moespec-compiled (budgets [None, k, 2k, 4k]) and plain-compiled (exact)."""
    model = build_model(sw.model, sw.layers, sw.device, sw.dtype)
    k = sw.model["num_experts_per_tok"]
    drafter = RandomChainDrafter(sw.model["vocab_size"])
    moespec = msc.SpeculativeDecoder(model, drafter=drafter, tree=0, compile=True, collect_expert_stats=False,
                                     compile_options={"inner": sw.inner, "kernels": "triton"})
    plain = msc.SpeculativeDecoder(torch.compile(model, backend=sw.baseline, dynamic=False), drafter=drafter,
                                   tree=0, collect_expert_stats=False)
    prompt = torch.randint(0, sw.model["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(sw.device)
    budgets = [None if m is None else m * k for m in sw.budgets_k]
    out = box.partial = dict(rows=[], skipped=[], errors=[])
    rows = out["rows"]
    before = dict(_pass_counters())
    points = [(name, dec, n, c) for n in sw.sizes
              for name, dec, cs in (("moespec", moespec, budgets), (f"plain {sw.baseline}", plain, [None]))
              for c in cs]
    _measure(points, "", _verify_point, rows, box, prompt, sw)
    _ratios_to_plain(rows)
    passes = {key: n - before.get(key, 0) for key, n in _pass_counters().items()}
    big = 16 if 16 in sw.sizes else max(sw.sizes)
    profiles = out["profiles"] = []
    _measure([("moespec", moespec, 1, None), ("moespec", moespec, 1, 2 * k), ("moespec", moespec, big, 2 * k),
              (f"plain {sw.baseline}", plain, 1, None), (f"plain {sw.baseline}", plain, big, None)],
             "profile ", _profile_point, profiles, box, prompt, sw)
    eagle = out["eagle3"] = []  # the drafting step of an EAGLE-3 head at these shapes (chain of 4, C = 2k too)
    if not box.expired():
        try:
            dec = eagle3_decoder(model, moespec.verify_model, sw)
            _measure([("moespec, EAGLE-3 head (random)", dec, 5, c) for c in (None, 2 * k)], "", _verify_point, eagle,
                     box, prompt, sw)
        except Exception as err:
            _error(out, "EAGLE-3 head", err)
    if not passes.get("experts_fused"):
        out["errors"].append(f"moespec fused no experts block in this model (pass counters: {passes})")
    cfg = model.config
    return dict(out, model=sw.model_name, layers=sw.layers, config=sw.model, passes=passes,
                experts_implementation=getattr(cfg, "_experts_implementation_internal", None)
                or getattr(cfg, "_experts_implementation", None), cuda_graphs=moespec.cuda_graphs,
                markdown=[f"{sw.model_name}, {sw.layers} layer(s); CUDA graphs: {moespec.cuda_graphs}; ms per verify "
                          "pass as the decoder times it (masks, inputs, replay)", "",
                          "| compiled | N | C | verify ms [p10, p90] | x plain | step ms | tokens/step | buckets |",
                          "|---|---|---|---|---|---|---|---|"] + [
                    f"| {r['compiled']} | {r['N']} | {r['C']} | {r['verify_median_ms']:.2f} "
                    f"[{r['verify_p10_ms']:.2f}, {r['verify_p90_ms']:.2f}] | {r.get('x_plain', '-')} | "
                    f"{r['step_median_ms']:.2f} | {r['tokens_per_step']:.2f} | {r['buckets']} |" for r in rows]
                + ["", "EAGLE-3 head of random weights at this model's shapes, a chain of 4 (ms per drafted token, "
                   "per verify pass, per step):", "", "| C | draft ms / token | verify ms | step ms |",
                   "|---|---|---|---|"]
                + [f"| {r['C']} | {r['draft_ms_per_token']:.3f} | {r['verify_median_ms']:.2f} | "
                   f"{r['step_median_ms']:.2f} |" for r in eagle]
                + [line for p in profiles for line in _profile_markdown(p)])


def _measure(points, label: str, measure, into: list, box: Box, prompt, sw: Sweeps) -> None:
    """measure(dec, prompt, n, c, sw) per (name, decoder, N, C) point into `into`, while the box lasts; a failing
    point goes to the part's errors and the next one runs."""
    out = box.partial
    for name, dec, n, c in points:
        if box.expired():
            out["skipped"].append(f"{label}{name} N={n} C={c}")
            continue
        try:
            into.append(dict(compiled=name, N=n, C=c, **measure(dec, prompt, n, c, sw)))
        except Exception as err:
            _error(out, f"{label}{name} N={n} C={c}", err)


def _profile_point(dec, prompt, n: int, c, sw: Sweeps, top: int = 10) -> dict:
    """Where a warm decoder's time goes over one generate call: the ops with the most self device time (CUDA
    kernels, those of graph replays included; on the CPU self CPU time), per decoding step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = sw.device.type == "cuda"
    run = lambda: dec.generate(prompt, max_new_tokens=sw.new_tokens, eos_token_id=None, tree=n - 1, budget=c)
    run()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        steps = run().stats.steps
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted((e for e in prof.key_averages() if getattr(e, key) > 0), key=lambda e: getattr(e, key),
                    reverse=True)
    per_step = lambda x: x / max(steps, 1)  # noqa: E731
    return dict(timed=key, steps=steps, total_us_per_step=per_step(sum(getattr(e, key) for e in events)),
                top=[dict(op=e.key[:90], us_per_step=per_step(getattr(e, key)), calls_per_step=per_step(e.count))
                     for e in events[:top]])


def _profile_markdown(p: dict) -> list[str]:
    return ["", f"{p['compiled']}, N = {p['N']}, C = {p['C']}: {p['total_us_per_step']:.0f} us of {p['timed']} per "
            f"step over {p['steps']} steps; the top ops:", "", "| op | us / step | calls / step |", "|---|---|---|"] + [
        f"| `{t['op']}` | {t['us_per_step']:.1f} | {t['calls_per_step']:.1f} |" for t in p["top"]]


def _pass_counters() -> dict:
    """What the backend's passes did so far: dynamo's counters["moespec"] (graphs, experts_fused, ...)."""
    return dict(torch._dynamo.utils.counters.get("moespec", {}))


def _ratios_to_plain(rows) -> None:
    """x_plain: the plain compile's verify ms at the same N over this row's (> 1: faster than plain)."""
    plain = {r["N"]: r["verify_median_ms"] for r in rows if r["compiled"] != "moespec"}
    for r in rows:
        if r["compiled"] == "moespec" and r["N"] in plain:
            r["x_plain"] = round(plain[r["N"]] / r["verify_median_ms"], 3)


def _verify_point(dec, prompt, n: int, c, sw: Sweeps) -> dict:
    """Warm up (compile, capture), then ms per verify pass and per step over sw.repeats generate calls."""
    run = lambda: dec.generate(prompt, max_new_tokens=sw.new_tokens, eos_token_id=None, tree=n - 1, budget=c).stats
    run()
    verify, step, draft, per_step, buckets = [], [], [], [], set()
    for _ in range(sw.repeats):
        s = run()
        verify.append(s.time_verify / s.steps)
        step.append((s.time_draft + s.time_verify + s.time_accept) / s.steps)
        draft.append(s.time_draft / s.steps / max(n - 1, 1))
        per_step.append(s.tokens_per_step)
        buckets.update(s.buckets)
    v = _spread(verify, 1e3)
    return dict(verify_median_ms=v["median"], verify_p10_ms=v["p10"], verify_p90_ms=v["p90"],
                step_median_ms=1e3 * statistics.median(step), draft_ms_per_token=1e3 * statistics.median(draft),
                tokens_per_step=statistics.mean(per_step), buckets=sorted(buckets, key=str))


def eagle3_decoder(model, compiled, sw: Sweeps):
    """A decoder verifying through `compiled` (the moespec-compiled model) with an EAGLE-3 head of random weights
    at the model's own shapes (hidden, heads, intermediate; draft vocabulary min(V, 32000), as public heads for
    Qwen3-30B-A3B): what a drafting step costs there. Aux layers (0, L // 2, L - 1), all inside this shallow model."""
    from moe_spec_compile.eagle3 import Eagle3Config, Eagle3Head

    cfg, n = model.config, model.config.num_hidden_layers
    head_cfg = Eagle3Config(hidden_size=cfg.hidden_size, target_hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                            draft_vocab_size=min(cfg.vocab_size, 32000), num_attention_heads=cfg.num_attention_heads,
                            num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                            intermediate_size=cfg.intermediate_size, aux_layer_ids=(0, n // 2, n - 1))
    torch.manual_seed(1)
    with torch.device(sw.device):
        head = Eagle3Head(head_cfg, embed_tokens=model.get_input_embeddings()).to(sw.dtype).eval()
    drafter = msc.Eagle3Drafter(head, model, compile=sw.inner == "inductor")
    return msc.SpeculativeDecoder(compiled, drafter=drafter, tree=0, collect_expert_stats=False)


# --- e: the bundled model, speculative against transformers' generate --------------------------------
def part_e(sw: Sweeps, box: Box) -> dict:
    """On the bundled model, through bench_speculative: transformers' generate, the model drafter's tree with
    no budget and (when compiled with moespec: a budget needs it) with C = E/4, the decoder's own AR loop (tree=0),
    then (time allowing) the shipped EAGLE-3 head's shapes; tok/s over generate's and over tree=0's."""
    target, draft, tok = msc.load_tiny(dtype=sw.dtype, device=sw.device)
    prompt = tok("def main(argv):", return_tensors="pt").input_ids.to(sw.device)
    args = argparse.Namespace(max_new_tokens=sw.e_new_tokens, repeats=sw.repeats, inner=sw.inner,
                              no_compile=not sw.e_compile)
    bench_speculative = _bench("bench_speculative")
    shape = lambda tree: msc.TreeSpec(*tree) if isinstance(tree, tuple) else tree  # noqa: E731
    budgets = [None, target.config.num_experts // 4] if sw.e_compile else [None]
    cases = [("speculative", shape(tree), "model", budgets) for tree in sw.e_trees]
    cases.append(("autoregressive (decoder, tree=0)", 0, "none", [None]))
    cases += [("speculative, EAGLE-3 head", shape(tree), "eagle3", [None]) for tree in sw.e_eagle_trees]
    skipped = []
    with torch.no_grad():
        rows = box.partial["rows"] = [bench_speculative.generate_row(args, target, prompt, sw.device)]
        for mode, tree, drafter, budgets in cases:
            if box.expired():
                skipped.append(f"{mode} tree={tree}")
                continue
            rows += bench_speculative.decoder_rows(args, target, draft, prompt, sw.device, mode, tree, drafter, budgets)
    hf = rows[0]["tok_s"]
    ar = next((r["tok_s"] for r in rows if r["tree"] == "0"), None)
    for r in rows:
        r["x_transformers_generate"] = r["tok_s"] / hf
        r["x_tree0"] = None if ar is None else r["tok_s"] / ar
    return dict(rows=rows, skipped=skipped, markdown=[
        "| mode | tree | budget | tok/s [range] | accepted tokens/step | x generate | x tree=0 |",
        "|---|---|---|---|---|---|---|"] + [
        f"| {r['mode']} | {r['tree']} | {r['budget']} | {r['tok_s']:.1f} [{r['tok_s_range'][0]:.1f}, "
        f"{r['tok_s_range'][1]:.1f}] | {r['tokens_per_step']} | {r['x_transformers_generate']:.2f} | "
        f"{'-' if r['x_tree0'] is None else format(r['x_tree0'], '.2f')} |" for r in rows])


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e}
TITLES = {"a": "GPU tests (pytest -m gpu)", "b": "fused experts vs torch / transformers experts, copy floor",
          "c": "routing-metadata kernel (E = 256)", "d": "verify latency per (N, C) and AR step, moespec vs plain",
          "e": "bundled model: speculative vs transformers generate"}
