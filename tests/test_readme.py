"""Every ```python block of README.md runs as pasted: each on its own (blocks define what they use), with plain
`python` (no -P) from the repository root, as a reader would paste it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
BUNDLED = (ROOT / "moe_spec_compile" / "tiny" / "target" / "model.safetensors").exists()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    code = BLOCKS[index]
    if "load_tiny" in code and not BUNDLED:
        pytest.skip("no bundled checkpoints")
    proc = subprocess.run([sys.executable, "-"], input=code, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README block {index} failed:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"README block {index} printed nothing"
