"""The `moespec` command line: one function per subcommand, each driving the module that does the work.

argv -> subcommand -> its parser checks every argument (one-line errors, exit 2) -> the model is loaded -> work

    moespec generate ...  speculative decoding on the bundled model, a checkpoint or a config (generate_cli.py)
    moespec demo ...      the bundled model under a range of expert budgets: speed and quality (demo.py)
    moespec explain ...   the MoE blocks the backend finds, rewrites or declines (explain.py)
    moespec tune ...      tile configurations for the Triton fused-experts kernels (kernels/tune.py)
    moespec profile ...   the cost model measured on this device: predicted next to measured speedup (cost.py)

The shared argument types live here too, so every command reads `--budget`, `--tree`, `--device`,
`--config NAME` (a transformers config class) and `--model PATH` (a local checkpoint directory) alike.
Nothing here imports torch or transformers until a command runs.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys

__all__ = ["main", "budget_arg", "budgets_arg", "tree_arg", "positive_int", "model_dir", "config_class",
           "check_device", "new_parser"]


# --- one function per subcommand ---------------------------------------------------------------------

def generate(argv: list[str]) -> int:
    """speculative decoding on the bundled model, a local checkpoint or a config-built one"""
    from .generate_cli import main as run

    return run(argv)


def demo(argv: list[str]) -> int:
    """the bundled model under a range of expert budgets: speedup over plain decoding, and quality"""
    from .demo import main as run

    return run(argv)


def explain(argv: list[str]) -> int:
    """which MoE blocks the backend finds, rewrites or declines, and why"""
    from .explain import main as run

    return run(argv)


def tune(argv: list[str]) -> int:
    """tile configurations for the Triton fused-experts kernels (needs CUDA, or TRITON_INTERPRET=1)"""
    from .kernels.tune import main as run

    return run(argv)


def profile(argv: list[str]) -> int:
    """measure the cost model on this device: AR step, verify per (N, C), predicted vs measured speedup"""
    from .cost import main as run

    return run(argv)


COMMANDS = {"generate": generate, "demo": demo, "explain": explain, "tune": tune, "profile": profile}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moespec", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="moespec: a torch.compile backend and speculative decoding for Mixture-of-Experts models.",
        epilog="commands:\n" + "\n".join(f"  {name:<10} {fn.__doc__}" for name, fn in COMMANDS.items())
        + "\n\n`moespec COMMAND --help` lists a command's options and their defaults.")
    p.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND", help="what to do (below)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # exits 2 with "invalid choice" and the list of commands
    return int(COMMANDS[argv[0]](argv[1:]) or 0)


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
    from .speculative.tree import TreeSpec

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


if __name__ == "__main__":
    sys.exit(main())
