"""The `moespec` command line: arguments are checked before any model loads (one-line errors, exit 2),
flags mean the same in every command, and the commands print what they promise.

Bad arguments go through main() in-process (argparse exits 2 before torch work starts); the commands
that load a model run on tiny config-built models or the bundled checkpoint with a few tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe_spec_compile.cli import main
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
    (["generate", "--sample", "--top-p", "1.5"], "--top-p"),
    (["explain", "--config", "Foo"], "unknown transformers config class"),
    (["explain", "--model", "/nonexistent/dir"], "not a directory"),
    (["explain", "--config", "Qwen3MoeConfig", "--model", "."], "not allowed with"),
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
    assert _fails(["bogus"], capsys).endswith("'tune')")


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
    """--config NAME: a random target of that family, ngram drafter, budget 8 in every verify bucket."""
    argv = ["generate", "--config", "Qwen3MoeConfig", "--prompt-ids", "5,6,7,5,6,7,5", "--tree", "6,3,2",
            "--budget", "8", "--max-new-tokens", "6", "--json", "--no-compile"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["new_token_ids"]) == 6 and out["drafter"] == "ngram" and out["tokens_per_s"] > 0
    assert all(b == 8 for _, b in out["stats"]["buckets"]) and out["stats"]["new_tokens"] == 6


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


def test_generate_tree_0_is_plain_decoding(capsys):
    argv = ["generate", "--config", "Qwen3MoeConfig", "--prompt-ids", "5,6,7", "--tree", "0", "--max-new-tokens",
            "4", "--json", "--no-compile"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "no speculation" in captured.err
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["stats"]["tokens_per_step"] == 1.0 and len(out["new_token_ids"]) == 4
