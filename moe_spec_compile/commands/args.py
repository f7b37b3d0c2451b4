"""The argument types every `moespec` command shares, so `--budget`, `--tree`, `--device`, `--config NAME`
(a transformers config class) and `--model PATH` (a local checkpoint directory) read alike in each.

argument text -> its type checks it (argparse.ArgumentTypeError: a one-line message, exit 2) -> the value

Below the command modules: it imports none of them. Nothing here imports torch or transformers until a
check needs it.
"""

from __future__ import annotations

import argparse
import difflib
import os

__all__ = ["new_parser", "positive_int", "budget_arg", "budgets_arg", "tree_arg", "model_dir", "KNOWN_CONFIGS",
           "config_class", "check_device", "quiet_loading"]


# --- shared argument types (each raises argparse.ArgumentTypeError: a one-line message, exit 2) ------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help; description and examples kept as written."""


def new_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A subcommand's parser: the module docstring's first paragraph as description, its indented
    `moespec ...` lines as examples, defaults in --help."""
    description = (doc or "").strip().split("\n\n")[0]
    examples = [line for line in (doc or "").splitlines() if line.strip().startswith(("moespec ", "TRITON_"))]
    epilog = "examples:\n" + "\n".join(examples) if examples else None
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=_HelpFormatter)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def budget_arg(text: str) -> int | None:
    """'none' / 'exact' -> None (no budget); an integer C >= 1 -> C experts per MoE layer per verify pass."""
    if text.strip().lower() in ("none", "exact"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a budget is an integer C >= 1 (experts per layer per verify pass) or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"a budget is an integer C >= 1 or 'none' (no budget), got {value}: a verify pass needs experts")
    return value


def budgets_arg(text: str) -> list[int]:
    """'4,8,16' -> [4, 8, 16] (each checked as a budget; the exact run is always added by the caller)."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated budgets such as 4,8,16")
    values = [budget_arg(p) for p in parts]
    if any(v is None for v in values):
        raise argparse.ArgumentTypeError("the exact run (no budget) is always included; list integer budgets only")
    return values


def resident_arg(text: str) -> int | float:
    """'R' (an integer >= 1: experts kept resident per MoE layer) or a share of the layer's experts in (0, 1]."""
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer R >= 1 or a share in (0, 1], got {text!r}") from None
    if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected an integer R >= 1 or a share in (0, 1], got {text!r}")
    return value


def tree_arg(text: str):
    """'K' -> a chain of K drafted tokens (0: no speculation, plain decoding); 'TOTAL,DEPTH,TOP_K' -> a
    TreeSpec (EAGLE-2 style dynamic tree); 'auto' -> the decoder picks (where it supports that)."""
    text = text.strip()
    if text.lower() == "auto":
        return "auto"
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K, TOTAL,DEPTH,TOP_K or auto, got {text!r}") from None
    if any(p < 0 for p in parts) or len(parts) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected K >= 0 or TOTAL,DEPTH,TOP_K (each >= 1), got {text!r}")
    if len(parts) == 1:
        return parts[0]
    if min(parts) < 1:
        raise argparse.ArgumentTypeError(f"TOTAL,DEPTH,TOP_K must each be >= 1, got {text!r}")
    from ..speculative.tree import TreeSpec

    return TreeSpec(*parts)


def model_dir(text: str) -> str:
    """A local checkpoint directory (config.json and weights, as save_pretrained writes them)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"not a directory: {text!r} (give a local checkpoint directory)")
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"no config.json in {text!r}: not a transformers checkpoint directory")
    return text


KNOWN_CONFIGS = ("Qwen3MoeConfig", "Qwen2MoeConfig", "MixtralConfig", "OlmoeConfig", "DeepseekV3Config",
                 "GptOssConfig")


def config_class(text: str) -> str:
    """The name of a transformers config class, e.g. Qwen3MoeConfig (checked against transformers)."""
    import transformers

    cls = getattr(transformers, text, None) if text.endswith("Config") else None
    if isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig):
        return text
    names = [n for n in dir(transformers) if n.endswith("Config")]
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise argparse.ArgumentTypeError(f"unknown transformers config class {text!r}; {hint}"
                                     f"MoE examples: {', '.join(KNOWN_CONFIGS)}")


def check_device(parser: argparse.ArgumentParser, device: str) -> str:
    """'cpu', 'cuda', 'cuda:1', ...: refuse devices this torch build or machine does not have."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        parser.error(f"--device: not a device: {device!r} (try cpu or cuda)")
    if dev.type == "cuda":
        if torch.version.cuda is None:
            parser.error(f"--device {device}: this torch build ({torch.__version__}) has no CUDA; use --device cpu")
        if not torch.cuda.is_available():
            parser.error(f"--device {device}: no CUDA device is visible; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            parser.error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        parser.error(f"--device {device}: moespec runs on cpu or cuda")
    return device


def quiet_loading():
    """A context that hides transformers' "Loading weights" progress bars (the bundled models are tiny)."""
    import contextlib

    from transformers.utils import logging

    @contextlib.contextmanager
    def _quiet():
        was = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        try:
            yield
        finally:
            if was:
                logging.enable_progress_bar()

    return _quiet()

