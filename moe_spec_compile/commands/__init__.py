"""The `moespec` command line: one module per subcommand, each driving the library module that does the work.

argv -> subcommand -> its parser checks every argument (one-line errors, exit 2) -> the model is loaded -> work

    moespec generate ...  speculative decoding on the bundled model, a checkpoint or a config (generate.py)
    moespec demo ...      the bundled model under a range of expert budgets: speed and quality (demo.py)
    moespec explain ...   the MoE blocks the backend finds, rewrites or declines (explain.py -> ../explain.py)
    moespec tune ...      tile configurations for the Triton fused-experts kernels (tune.py -> kernels/tune.py)
    moespec profile ...   the cost model measured on this device: predicted next to measured speedup
                          (profile.py -> ../cost.py)

Imports flow one way: the command modules import the library and the shared argument types (args.py, below
them all); the library never imports a command. `python -m moe_spec_compile.commands ...` runs main too.
A command's module is imported when it runs, so `moespec --help` loads none of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "main"]

# name -> what it does; the module moe_spec_compile.commands.<name> holds its parser and main(argv)
COMMANDS = {
    "generate": "speculative decoding on the bundled model, a local checkpoint or a config-built one",
    "demo": "the bundled model under a range of expert budgets: speedup over plain decoding, and quality",
    "explain": "which MoE blocks the backend finds, rewrites or declines, and why",
    "tune": "tile configurations for the Triton fused-experts kernels (needs CUDA, or TRITON_INTERPRET=1)",
    "profile": "measure the cost model on this device: AR step, verify per (N, C), predicted vs measured speedup",
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moespec", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="moespec: a torch.compile backend and speculative decoding for Mixture-of-Experts models.",
        epilog="commands:\n" + "\n".join(f"  {name:<10} {what}" for name, what in COMMANDS.items())
        + "\n\n`moespec COMMAND --help` lists a command's options and their defaults.")
    p.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND", help="what to do (below)")
    return p


def _run(name: str, argv: list[str]) -> int:
    """Import the command's module now (not before: `moespec --help` stays fast) and run its main."""
    return importlib.import_module(f"{__name__}.{name}").main(argv)


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
    return int(_run(argv[0], argv[1:]) or 0)
