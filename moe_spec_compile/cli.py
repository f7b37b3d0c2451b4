"""The `moespec` command line: one subcommand per job, each living beside the code it drives.

moespec tune ...      tile configurations for the Triton fused-experts kernels (kernels/tune.py)
moespec generate ...  speculative decoding on the bundled or a config-built model (generate_cli.py)
moespec demo ...      the demo: budgets against quality on the bundled model (demo.py)
moespec explain ...   the MoE blocks the backend finds in a config-built model (explain.py)
"""

from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "tune": ("moe_spec_compile.kernels.tune", "tile configurations for the Triton fused-experts kernels"),
    "generate": ("moe_spec_compile.generate_cli", "speculative decoding on the bundled or a config-built model"),
    "demo": ("moe_spec_compile.demo", "budgets against quality on the bundled model"),
    "explain": ("moe_spec_compile.explain", "the MoE blocks found in a config-built model"),
}


def _usage() -> str:
    lines = ["usage: moespec COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _COMMANDS:
        print(f"moespec: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
