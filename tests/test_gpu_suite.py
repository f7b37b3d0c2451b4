"""The GPU check (benchmarks/gpu_suite.py, its parts in gpu_parts.py) on the CPU: its --dry-run runs every
part's code paths (kernels under TRITON_INTERPRET=1, tiny shapes, no CUDA graphs), so the script cannot rot
between lent devices; a failing part is reported with its traceback while the others run; the time boxes
cut sweeps and stop parts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _dry_run(out: Path, *args: str):
    """(completed process, the JSON report) of one dry run into out."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-P", str(SUITE), "--dry-run", "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    reports = list(out.glob("gpu_suite_*.json"))
    assert len(reports) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(reports[0].read_text())


def test_dry_run_every_part_ok(tmp_path):
    before = set((ROOT / "benchmarks" / "results").rglob("*"))
    proc, report = _dry_run(tmp_path)
    parts = report["parts"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(parts) == ["a", "b", "c", "d", "e"]
    bad = {name: (p["status"], p.get("errors"), p.get("traceback")) for name, p in parts.items()
           if p["status"] != "ok" or p["truncated"]}
    assert not bad
    meta = report["meta"]
    assert meta["dry_run"] and all(meta[k] for k in ("device", "torch", "triton", "transformers", "date", "command"))
    # each part measured what it is for
    assert "tests/test_kernels_gpu.py" in parts["a"]["files"]
    impls = {r["impl"] for r in parts["b"]["rows"] if "median_us" in r}
    assert impls == {"moespec", "torch_grouped_mm", "grouped_mm", "batched_mm"}
    ours = [r for r in parts["b"]["rows"] if r["impl"] == "moespec"]
    assert all(r["frac_copy_bw"] > 0 and r["copy_floor_us"] > 0 for r in ours)
    assert all(abs(r["time_ratio_to_best_torch"] * r["speedup_vs_best_torch"] - 1) < 1e-9 for r in ours)
    assert set(parts["b"]["per_shape"]) == {"tiny", "tiny-gpt-oss"}
    assert {r["C"] for r in ours} == {4, 8}  # with and without a budget (tiny shapes: E = 8, k = 2)
    assert parts["c"]["rows"] and all(r["E"] == 256 for r in parts["c"]["rows"])
    d = {(r["compiled"], r["N"], r["C"]) for r in parts["d"]["rows"]}
    assert d == {("moespec", 1, None), ("moespec", 1, 2), ("plain eager", 1, None),
                 ("moespec", 4, None), ("moespec", 4, 2), ("plain eager", 4, None)}
    assert all(r["buckets"] == [[r["N"], r["C"]]] for r in parts["d"]["rows"])  # every pass had exactly N tokens
    eagle = parts["d"]["eagle3"]  # an EAGLE-3 head's drafting step at the model's shapes, exact and under C = 2k
    assert [(r["N"], r["C"]) for r in eagle] == [(5, None), (5, 4)] and all(r["draft_ms_per_token"] > 0 for r in eagle)
    profiles = parts["d"]["profiles"]  # where the time goes, per op, for the next device session
    assert [(p["compiled"], p["N"], p["C"]) for p in profiles] == [
        ("moespec", 1, None), ("moespec", 1, 4), ("moespec", 4, 4), ("plain eager", 1, None), ("plain eager", 4, None)]
    assert all(p["steps"] > 0 and p["top"] and p["total_us_per_step"] >= p["top"][0]["us_per_step"] > 0
               for p in profiles)
    e = parts["e"]["rows"]
    # the dry run does not compile the bundled target, so no budgeted row (a budget needs a moespec target)
    assert [(r["tree"], r["budget"]) for r in e] == [("-", None), ("4", None), ("0", None), ("4", None)]
    assert e[-1]["drafter"] == "eagle3" and e[-1]["x_tree0"] > 0  # the shipped EAGLE-3 head, against tree=0
    assert e[0]["mode"].startswith("autoregressive (transformers generate") and e[1]["tokens_per_step"] >= 1
    md = (tmp_path / "gpu_suite_cpu_dry_run.md").read_text()
    assert "| b | fused experts" in md and meta["command"] in md
    assert set((ROOT / "benchmarks" / "results").rglob("*")) == before  # a dry run leaves the checkout alone


def test_failing_part_is_reported_and_the_rest_runs(tmp_path):
    proc, report = _dry_run(tmp_path, "--parts", "b,c", "--fail-part", "b")
    assert proc.returncode == 1
    b, c = report["parts"]["b"], report["parts"]["c"]
    assert b["status"] == "failed" and "failed on purpose" in b["traceback"]
    assert c["status"] == "ok" and c["rows"]
    assert "failed on purpose" in (tmp_path / "gpu_suite_cpu_dry_run.md").read_text()


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_expired_box_skips_points(suite):
    sw = suite.Sweeps.make(quick=False, dry=True)
    result = suite.run_part("c", sw, time.monotonic() - 1, fail=False)
    assert result["status"] == "ok" and result["truncated"] and not result["rows"]
    assert result["skipped"] == ["T*k=64 BLOCK_M=16", "T*k=64 BLOCK_M=64"]


def test_hard_limit_stops_a_part(suite, monkeypatch):
    monkeypatch.setattr(suite, "HARD_GRACE_S", 0)

    def slow(sw, box):
        box.partial["rows"] = ["measured before the stop"]
        time.sleep(30)

    monkeypatch.setitem(suite.PARTS, "c", slow)
    t0 = time.monotonic()
    result = suite.run_part("c", suite.Sweeps.make(quick=False, dry=True), time.monotonic() + 1, fail=False)
    assert result["status"] == "timeout" and "PartTimeout" in result["traceback"]
    assert result["rows"] == ["measured before the stop"]
    assert time.monotonic() - t0 < 10


def test_budgets_shorten_named_parts_only(suite):
    """--budgets a=60,d=130: those parts' boxes, the rest keep BUDGET_S; anything else is refused by name."""
    budgets = suite._budgets("a=60, d=130.5")
    assert budgets == {**suite.BUDGET_S, "a": 60.0, "d": 130.5}
    for bad in ("z=10", "a=", "a=-5", "a=0", "a"):
        with pytest.raises(ValueError, match="--budgets"):
            suite._budgets(bad)


def test_quick_halves_the_sweeps(suite):
    full, quick = suite.Sweeps.make(quick=False, dry=False), suite.Sweeps.make(quick=True, dry=False)
    assert full.tokens == (1, 2, 4, 8, 16, 32, 64, 128) and quick.tokens == (1, 4, 16, 64)
    assert len(quick.route_pairs) * 2 == len(full.route_pairs) and max(full.route_pairs) == 4096
    assert len(quick.sizes) * 2 == len(full.sizes) and quick.sizes[0] == 1
    assert sorted(full.shapes) == ["gpt-oss-20b", "mixtral-8x7b", "olmoe-1b-7b", "qwen3-30b-a3b"]


def test_failing_case_is_isolated(suite, monkeypatch):
    """A sweep point that raises is listed with the first traceback; the part's other points still run."""
    from moe_spec_compile.kernels import fused_moe

    if not fused_moe._interpreted():
        pytest.skip("the kernels were imported without TRITON_INTERPRET=1")
    bench_kernels = sys.modules["gpu_parts"]._bench("bench_kernels")
    real = bench_kernels.bench_case

    def flaky(name, *args, **kwargs):
        if name == "tiny":
            raise RuntimeError("boom")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(bench_kernels, "bench_case", flaky)
    result = suite.run_part("b", suite.Sweeps.make(quick=False, dry=True), time.monotonic() + 300, fail=False)
    assert result["status"] == "failed" and result["errors"] == ["tiny T=2 C=8: RuntimeError: boom",
                                                                 "tiny T=2 C=4: RuntimeError: boom"]
    assert "boom" in result["first_traceback"] and {r["model"] for r in result["rows"]} == {"tiny-gpt-oss"}
