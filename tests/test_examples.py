"""Every script in examples/ runs as a user would run it: plain `python examples/NAME.py` (no -P) from the
repository root, and prints what it promises (checked on its output, against the references it computes).

Also: with the repository root on sys.path (`python -c`, a REPL, a script in the root) our top-level
kernels/ folder must not pass for the Hugging Face `kernels` hub package that transformers probes for.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
BUNDLED = (ROOT / "moe_spec_compile" / "tiny" / "target" / "model.safetensors").exists()
NEEDS_BUNDLED = {"speculative_tiny.py", "quality_vs_budget.py"}


def run_python(args: list[str], timeout: int = 300, stdin: str | None = None) -> str:
    """Run the interpreter without -P, cwd = the repository root; fail with its output on a non-zero exit."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, input=stdin, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _number(text: str, label: str) -> float:
    return float(re.search(re.escape(label) + r"\s*=?\s*([-+0-9.e]+)", text).group(1))


def test_there_are_examples():
    assert len(EXAMPLES) >= 5, EXAMPLES
    for name in EXAMPLES:
        assert len((ROOT / "examples" / name).read_text().splitlines()) <= 60, f"{name}: examples stay short"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name):
    if name in NEEDS_BUNDLED and not BUNDLED:
        pytest.skip("no bundled checkpoints")
    out = run_python([f"examples/{name}"])
    checks = {
        "compile_transformers_moe.py": lambda: (
            _number(out, "max |exact - model|") < 1e-4
            and all(len(m.split(",")) <= 4 for m in re.findall(r"used experts \(([^)]*)\) \(budget 4\)", out))
            and out.count("used experts") == 2 and "fused_experts" in out),
        "plain_pytorch_moe.py": lambda: (
            _number(out, "max |compiled - eager|") < 1e-4 and out.count("fused_experts") == 2
            and all(len(m.split(",")) <= 3 for m in re.findall(r"'layers\.\d': \(([^)]*)\)", out))),
        "speculative_tiny.py": lambda: (
            "def main(argv):" in out and "tokens per pass" in out
            and "exact speculative output == greedy output: True" in out),
        "quality_vs_budget.py": lambda: (
            re.search(r"exact\s+\S+\s+\S+\s+\S+\s+100\.0%", out) is not None
            and re.search(r"\n\s+(\d+)\s+\1\.0\s", out) is not None),  # a budget C row loading C experts
        "custom_op_in_another_engine.py": lambda: (
            _number(out, "max |op - per-token loop|") < 1e-5 and "compiled equal: True" in out),
    }
    assert name in checks, f"add a check of {name}'s output"
    assert checks[name](), out


SCRIPT_IN_ROOT = """
import sys, torch, transformers
import moe_spec_compile as msc
from transformers.utils.import_utils import is_kernels_available
cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                 num_experts_per_tok=2)
model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
compiled = torch.compile(model, backend="moespec", options={"budget": 2, "inner": "eager"})
with torch.inference_mode():
    print("logits", tuple(compiled(torch.randint(0, 64, (1, 5)), use_cache=False).logits.shape))
print("hub kernels available:", is_kernels_available())
try:
    import kernels
except ImportError:
    kernels = None
print("kernels file:", getattr(kernels, "__file__", None))
print("kernels version:", getattr(kernels, "__version__", None))
"""


def _lines(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_script_with_repo_root_on_path():
    """`python -` from the root puts the root on sys.path: transformers finds our kernels/ there. What it and
    `import kernels` see must be what they see with the root off sys.path (-P), whether or not the Hugging Face
    kernels hub package is installed: the hub package where it is, "not installed" (our folder, empty and
    versionless) where it is not."""
    reference = _lines(run_python(["-P", "-"], stdin=SCRIPT_IN_ROOT))
    out = run_python(["-"], stdin=SCRIPT_IN_ROOT)
    assert "logits (1, 5, 64)" in out, out
    got = _lines(out)
    assert got["hub kernels available"] == reference["hub kernels available"], (got, reference)
    assert got["kernels version"] == reference["kernels version"], (got, reference)
    if reference["kernels file"] != "None":  # the hub package is installed: it is the module imported
        assert got["kernels file"] == reference["kernels file"], (got, reference)
    else:  # not installed: our folder answers, empty and versionless, which transformers reads as absent
        assert got["hub kernels available"] == "False" and got["kernels version"] == "None", got
        assert got["kernels file"] == str(ROOT / "kernels" / "__init__.py"), got


def test_installed_hub_package_wins_over_our_folder(tmp_path):
    """Where a hub package comes on sys.path after the root (ahead of any other one installed), importing
    `kernels` from the root gives that package, exactly as Python would without our folder there."""
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "0.18.5"\nORIGIN = "hub"\n')
    out = run_python(["-c", f"import sys; sys.path.insert(1, {str(tmp_path)!r}); import kernels; "
                            "print(kernels.ORIGIN, kernels.__version__, kernels.__file__)"])
    assert out.strip() == f"hub 0.18.5 {fake / '__init__.py'}"
