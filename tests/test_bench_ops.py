"""benchmarks/bench_ops.py (the op microbenchmarks of `make bench-ops`) still imports and collects every case, and
`make test`'s collection (pytest tests) never picks it up. Collection only: nothing is built or timed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _collect(*paths: str) -> list[str]:
    """Test ids pytest collects from paths, as `make test` and `make bench-ops` run it (-P, from the root)."""
    done = subprocess.run([sys.executable, "-P", "-m", "pytest", "--collect-only", "-q", "-o", "addopts=", "-p",
                           "no:cacheprovider", *paths], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_bench_ops_collects_every_case():
    ids = _collect("benchmarks/bench_ops.py")
    names = {i.split("::")[1] for i in ids}
    for n in (1, 4, 16, 64):  # N tokens x C in (exact, 8, 16) for each op; the plain reference once per N
        for c in ("exact", "C8", "C16"):
            for test in ("test_routing", "test_fused_experts", "test_verify_moespec"):
                assert f"{test}[N{n}-{c}]" in names
        assert f"test_verify_plain[N{n}]" in names
    assert len(ids) == 3 * 12 + 4


def test_make_test_does_not_collect_bench_ops():
    makefile = (ROOT / "Makefile").read_text()
    test_recipe = makefile.split("\ntest:")[1].split("\n\n")[0]
    assert "-m pytest " in test_recipe and test_recipe.endswith(" tests")  # the tests folder only
    assert "-m pytest benchmarks/bench_ops.py" in makefile
    assert 'testpaths = ["tests"]' in (ROOT / "pyproject.toml").read_text()
    ids = _collect("tests")
    assert ids and not [i for i in ids if not i.startswith("tests/")]
