"""The `moespec` command line: arguments are checked before any model loads (one-line errors, exit 2),
flags mean the same in every command, and the commands print what they promise.

Bad arguments go through main() in-process (argparse exits 2 before torch work starts); the commands
that load a model run on tiny config-built models or the bundled checkpoint with a few tokens.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from moe_spec_compile.commands import main
from moe_spec_compile.tiny import HERE

BUNDLED = (HERE / "target" / "model.safetensors").exists()


def _fails(argv, capsys) -> str:
    """Run argv, expect exit code 2 and a one-line message (after argparse's usage lines)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2, exc.value.code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("argv,words", [
    (["generate", "--budget", "0"], "budget is an integer C >= 1"),
    (["generate", "--budget", "eight"], "'eight'"),
    (["generate", "--tree", "0,2,2"], "TOTAL,DEPTH,TOP_K"),
    (["generate", "--tree", "-1"], "K >= 0"),
    (["generate", "--max-new-tokens", "0"], "integer >= 1"),
    (["generate", "--config", "Qwen3MoEConfig"], "did you mean Qwen3MoeConfig"),
    (["generate", "--config", "NoSuchConfig"], "MoE examples"),
    (["generate", "--model", "/nonexistent/dir"], "not a directory"),
    (["generate", "--prompt-ids", "1,x"], "comma-separated integers"),
    (["generate", "--config", "Qwen3MoeConfig", "--drafter", "model"], "--draft PATH"),
    (["generate", "--config", "Qwen3MoeConfig", "--drafter", "eagle3"], "--eagle PATH"),
    (["generate", "--eagle", str(HERE / "eagle3"), "--drafter", "ngram"], "EAGLE-3 head"),
    (["generate", "--sample", "--top-p", "1.5"], "--top-p"),
    (["explain", "--config", "Foo"], "unknown transformers config class"),
    (["explain", "--model", "/nonexistent/dir"], "not a directory"),
    (["explain", "--config", "Qwen3MoeConfig", "--model", str(HERE / "target")], "not allowed with"),
    (["generate", "--offload", "0"], "integer R >= 1 or a share"),
    (["generate", "--offload", "1.5"], "integer R >= 1 or a share"),
    (["generate", "--parallel", "ep"], "under torchrun"),
    (["demo", "--budgets", "0"], "budget is an integer C >= 1"),
    (["demo", "--budgets", "4,x"], "'x'"),
    (["demo", "--repeats", "0"], "integer >= 1"),
])
def test_bad_arguments_fail_fast_in_one_line(argv, words, capsys):
    assert words in _fails(argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA build with a device accepts --device cuda")
@pytest.mark.parametrize("command", ["generate", "explain", "demo"])
def test_device_cuda_without_cuda(command, capsys):
    assert "use --device cpu" in _fails([command, "--device", "cuda"], capsys)


def test_model_dir_needs_config_json(tmp_path, capsys):
    assert "no config.json" in _fails(["explain", "--model", str(tmp_path)], capsys)


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: moespec" in err and "generate" in err and "explain" in err
    assert main(["--help"]) == 0
    assert _fails(["bogus"], capsys).endswith("'tune', 'profile')")


@pytest.mark.parametrize("command", ["generate", "explain", "demo"])
def test_help_shows_descriptions_and_defaults(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "(default:" in out and "--device" in out
    if command != "demo":
        assert "--config NAME" in out and "--model PATH" in out


def test_explain_deepseek_config(capsys):
    """The family whose attention needs extra config fields: a table, not a dynamo traceback."""
    torch._dynamo.reset()
    assert main(["explain", "--config", "DeepseekV3Config", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("model.layers.") == 2 and "sigmoid" in out and "fused_experts" in out


def test_explain_failure_is_one_line(capsys):
    """A config class that is not a causal LM: one line saying so, exit code 1."""
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--config", "CLIPVisionConfig"])
    assert "cannot build a causal LM from CLIPVisionConfig" in str(exc.value.code)


@pytest.mark.skipif(not BUNDLED, reason="no bundled checkpoints")
def test_explain_defaults_to_the_bundled_target(capsys):
    torch._dynamo.reset()
    assert main(["explain", "--tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "bundled tiny target" in captured.err and "model.layers.2.mlp" in captured.out
    assert "Loading weights" not in captured.err


def test_generate_config_json(capsys):
    """--config NAME: a random target of that family, ngram drafter, budget 8 in every verify bucket; with
    --no-compile the budget could not bind, so it is refused (issue 14)."""
    argv = ["generate", "--config", "Qwen3MoeConfig", "--prompt-ids", "5,6,7,5,6,7,5", "--tree", "6,3,2",
            "--budget", "8", "--max-new-tokens", "6", "--json"]
    with pytest.raises(SystemExit, match="compile=True"):
        main(argv + ["--no-compile"])
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["new_token_ids"]) == 6 and out["drafter"] == "ngram" and out["tokens_per_s"] > 0
    assert all(b == 8 for _, b in out["stats"]["buckets"]) and out["stats"]["new_tokens"] == 6


def test_generate_offloaded_equals_in_memory(capsys):
    """--offload R: the same greedy tokens as the in-memory target, and the offload's counts in the output."""
    argv = ["generate", "--config", "Qwen3MoeConfig", "--prompt-ids", "5,6,7,5,6,7,5", "--tree", "4",
            "--budget", "6", "--max-new-tokens", "8", "--json"]
    assert main(argv) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(argv + ["--offload", "0.25", "--offload-store", "disk"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["new_token_ids"] == want["new_token_ids"] and want["offload"] is None
    assert all(b["misses"] > 0 and b["slots"] >= 1 for b in got["offload"].values())
    with pytest.raises(SystemExit, match="--offload: resident=99"):
        main(argv + ["--offload", "99"])


@pytest.mark.skipif(not BUNDLED, reason="no bundled checkpoints")
def test_generate_bundled_prints_prompt_continuation_and_speed(capsys):
    torch._dynamo.reset()
    argv = ["generate", "--prompt", "def main(argv):", "--tree", "4", "--max-new-tokens", "8", "--no-compile"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "def main(argv):" in captured.out and "tokens/s" in captured.out and "tokens per pass" in captured.out
    assert "Loading weights" not in captured.err
    argv += ["--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["text"].startswith("def main(argv):") and out["text"].endswith(out["new_text"])
    assert len(out["new_token_ids"]) == 8


@pytest.mark.skipif(not BUNDLED, reason="no bundled checkpoints")
def test_generate_with_the_shipped_eagle3_head(capsys):
    """--drafter eagle3 on the bundled target: its shipped head drafts; greedy output equals the target's; a head
    directory that is no EAGLE-3 checkpoint is refused in one line."""
    from moe_spec_compile.tiny import HERE, load_tiny

    torch._dynamo.reset()
    argv = ["generate", "--prompt-ids", "5,17,33,40,41,42", "--tree", "4", "--max-new-tokens", "10", "--json",
            "--no-compile"]
    assert main(argv + ["--drafter", "eagle3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    target = load_tiny()[0]
    ids = torch.tensor([[5, 17, 33, 40, 41, 42]])
    want = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert out["drafter"] == "eagle3" and out["new_token_ids"] == want[0, 6:].tolist()
    with pytest.raises(SystemExit, match="moespec generate: architectures .*LlamaForCausalLMEagle3"):
        main(argv + ["--eagle", str(HERE / "draft")])  # a dense draft model's directory


def test_generate_tree_0_is_plain_decoding(capsys):
    argv = ["generate", "--config", "Qwen3MoeConfig", "--prompt-ids", "5,6,7", "--tree", "0", "--max-new-tokens",
            "4", "--json", "--no-compile"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "no speculation" in captured.err
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["stats"]["tokens_per_step"] == 1.0 and len(out["new_token_ids"]) == 4


def test_generate_stats_summary_is_rounded_and_printable():
    from moe_spec_compile.speculative.decoder import GenerateStats, VerifyStats

    stats = GenerateStats(steps=3, new_tokens=10, accepted_per_step=[4, 3, 3], time_prefill=0.0123456789,
                          time_draft=0.1, time_verify=0.3333333333, time_accept=1e-5)
    stats.verify = [VerifyStats(17, 24, 8, a, {"l0": 8, "l1": 7}, True) for a in (4, 3)]
    stats.verify.append(VerifyStats(17, 24, 8, 3, {"l0": 6, "l1": 5}, False))
    s = stats.summary()
    total = 0.0123456789 + 0.1 + 0.3333333333 + 1e-5
    assert s["tokens_per_step"] == round(10 / 3, 3) and s["tokens_per_s"] == round(10 / total, 2)
    assert s["experts_per_layer"] == round(41 / 6, 2) and s["budget_bound_fraction"] == round(2 / 3, 3)
    assert s["time_s"]["prefill"] == 0.01235 and s["time_s"]["accept"] == 1e-5 and s["buckets"] == [(24, 8)]
    text = str(stats)
    assert len(text.splitlines()) <= 8 and "tokens per pass  3.33" in text and "24 tokens C=8" in text


def test_summarize_events():
    from moe_spec_compile.record import ExpertEvent
    from moe_spec_compile.report import format_summary, summarize_events

    events = [ExpertEvent("m.0", 12, 4, (1, 2, 3, 9)), ExpertEvent("m.1", 12, 4, (0, 5, 6)),
              ExpertEvent("m.0", 30, None, tuple(range(11)))]
    s = summarize_events(events)
    assert s["executions"] == 3 and s["blocks"] == 2 and s["mean_experts"] == 6.0 and s["max_experts"] == 11
    assert s["budget_bound_fraction"] == 0.5 and s["mean_tokens"] == 18.0
    m0 = s["by_block"]["m.0"]
    assert m0 == {"executions": 2, "mean_tokens": 21.0, "mean_experts": 7.5, "min_experts": 4, "max_experts": 11,
                  "budgets": [None, 4], "budget_bound_fraction": 1.0}
    table = format_summary(s)
    assert table.splitlines()[2].split() == ["m.0", "2", "21.0", "7.5", "4-11", "exact,4", "100%"]
    assert summarize_events([])["executions"] == 0 and "block" in format_summary(summarize_events([]))


def test_explain_compile_failure_is_one_line(monkeypatch, capsys):
    """Whatever dynamo raises while explaining (100 lines of it) comes out as one line and exit code 1."""
    import importlib

    explain_module = importlib.import_module("moe_spec_compile.commands.explain")  # calls the library's explain
    def fails(*args, **kwargs):
        raise RuntimeError("shape mismatch in scaled_dot_product_attention\n" + "  frame ...\n" * 100)

    monkeypatch.setattr(explain_module, "explain", fails)
    assert main(["explain", "--config", "Qwen3MoeConfig", "--tokens", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("moespec explain: could not compile and run a small random Qwen3MoeConfig model: "
                       "RuntimeError: shape mismatch in scaled_dot_product_attention")


def _demo_rows(**tps):
    """Made-up demo rows: transformers' generate at 10-12 tok/s, tree=0 at 20-22, then the rows given."""
    from moe_spec_compile.commands.demo import DemoRow, add_speedups

    rows = [DemoRow("generate", None, [10.0, 12.0, 11.0]), DemoRow("tree=0", None, [20.0, 22.0, 21.0])]
    rows += [DemoRow(name, None if name == "exact" else int(name[2:]), t) for name, t in tps.items()]
    add_speedups(rows)
    return rows


def test_demo_speedups_against_both_baselines():
    from moe_spec_compile.commands.demo import speedup

    assert speedup([20.0, 24.0, 22.0], [10.0, 12.0, 11.0]) == (2.0, 20.0 / 12.0, 24.0 / 10.0)
    generate, tree0, c8 = _demo_rows(**{"C=8": [44.0, 48.0, 46.0]})
    assert c8.speedup_generate == speedup(c8.tokens_per_s, generate.tokens_per_s)
    assert c8.speedup_tree0 == (46.0 / 21.0, 44.0 / 22.0, 48.0 / 20.0)
    assert tree0.speedup_tree0[0] == 1.0 and generate.speedup_generate[0] == 1.0
    assert tree0.speedup_generate[0] == 21.0 / 11.0  # the baselines' own ratio is a row too


def test_demo_verdict_is_judged_against_tree0():
    from moe_spec_compile.commands.demo import verdict

    fast = _demo_rows(exact=[15.0, 16.0, 17.0], **{"C=8": [44.0, 48.0, 46.0]})
    assert "C=8, 2.19x tree=0's" in verdict(fast) and "speculation paid off" in verdict(fast)
    assert "4.18x transformers' generate" in verdict(fast)
    # faster than transformers' generate in every repeat, slower than tree=0 in every repeat: no win
    beats_generate_only = _demo_rows(exact=[15.0, 16.0, 17.0])
    words = verdict(beats_generate_only)
    assert "speculation paid off" not in words and "slower than tree=0 in every repeat" in words
    assert "exact, 0.76x tree=0's" in words
    assert "within the noise of tree=0" in verdict(_demo_rows(**{"C=4": [19.0, 23.0]}))
    baselines_only = _demo_rows()
    assert "paid off" not in verdict(baselines_only)  # tree=0 beating generate is not speculation


def test_demo_plot_draws_the_budget_sweep_as_one_curve():
    """Budget rows form the one curve, in x order; exact, auto and tree=0 are separate labelled points (nothing joins
    auto to the curve; tree=0 without a counted pass sits at top-k experts); transformers' generate is a level."""
    import matplotlib.pyplot as plt

    from moe_spec_compile.commands.demo import DemoRow, add_speedups, figure

    rows = _demo_rows(**{"C=8": [25.0, 27.0], "exact": [15.0, 16.0, 17.0], "C=4": [30.0, 31.0]})
    rows.append(DemoRow("auto", "auto", [24.0, 26.0], verify_experts_per_layer=12.0))
    add_speedups(rows)
    for r, experts in zip(rows[2:5], (7.0, 29.0, 4.0)):
        r.verify_experts_per_layer, r.heldout_accuracy, r.heldout_agreement, r.agreement = experts, 0.4, 0.9, 0.8
    fig = figure(rows, 64, 6)
    speed, quality = fig.axes
    joined = [list(line.get_xdata()) for line in speed.get_lines()
              if line.get_linestyle() not in ("None", "none") and list(line.get_xdata()) != [0, 1]]  # not a level
    assert joined == [[4.0, 7.0]]  # C=4, C=8
    points = {tuple(line.get_xdata()) for line in speed.get_lines() if line.get_linestyle() in ("None", "none")}
    assert {(29.0,), (12.0,), (6.0,)} <= points  # exact, auto, tree=0
    assert {"C=4", "C=8", "exact", "auto", "tree=0"} <= {t.get_text() for t in speed.texts}
    legend = [t.get_text() for t in speed.get_legend().get_texts()]
    assert "transformers greedy generate" in legend and any(t.startswith("auto") for t in legend)
    assert [list(line.get_xdata()) for line in quality.get_lines() if len(line.get_xdata()) > 1] == [[4.0, 7.0]] * 3
    plt.close(fig)


@pytest.mark.skipif(not BUNDLED, reason="no bundled checkpoints")
def test_generate_from_checkpoint_directories(capsys):
    """--model PATH / --draft PATH: local directories; without tokenizer files the ids are the output."""
    argv = ["generate", "--model", str(HERE / "target"), "--draft", str(HERE / "draft"), "--prompt-ids", "5,6,7",
            "--tree", "4", "--max-new-tokens", "6", "--no-compile", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["drafter"] == "model" and out["text"] is None and len(out["new_token_ids"]) == 6
    assert out["model"] == f"the checkpoint in {HERE / 'target'}"


# --- the structure: commands import the library, never the reverse ---------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"moe_spec_compile": ROOT / "moe_spec_compile", "moe_spec_compile.passes": ROOT / "passes",
           "moe_spec_compile.kernels": ROOT / "kernels"}
COMMANDS = "moe_spec_compile.commands"
# `python -m` scripts that rebuild the bundled models and their card: maintainers' tools with their own argparse
SCRIPTS = {"moe_spec_compile.tiny.train", "moe_spec_compile.tiny.card", "moe_spec_compile.tiny.train_eagle"}


def _modules() -> dict[str, Path]:
    """{dotted name: path} of every module of the package, passes/ and kernels/ included."""
    out = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            out[".".join((package, *parts[: -1 if parts[-1] == "__init__" else None]))] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module name the file imports (and each `from X import y` as X and X.y), relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _within(names: set[str], prefix: str) -> set[str]:
    return {n for n in names if n == prefix or n.startswith(prefix + ".")}


def test_imports_flow_one_way():
    """The library (moe_spec_compile/, passes/, kernels/) imports neither argparse nor the commands; the shared
    argument types sit below the commands; kernels/config.py does not import the launcher that reads it."""
    modules = _modules()
    library = {n: _imports(n, p) for n, p in modules.items() if not _within({n}, COMMANDS)}
    assert SCRIPTS <= set(library) and "moe_spec_compile.cost" in library and len(library) > 20
    wrong = {n: sorted(_within(names, COMMANDS) | (set() if n in SCRIPTS else _within(names, "argparse")))
             for n, names in library.items()}
    assert not {n: w for n, w in wrong.items() if w}
    assert not _within(library["moe_spec_compile.kernels.config"], "moe_spec_compile.kernels.fused_moe")
    args = _imports(f"{COMMANDS}.args", modules[f"{COMMANDS}.args"])
    assert not _within(args, COMMANDS) and "moe_spec_compile.speculative.tree" in args
    assert f"{COMMANDS}.args" in _imports(f"{COMMANDS}.generate", modules[f"{COMMANDS}.generate"])
