"""The versions `make test` and `make demo` install: write them, or compare an environment with them.

installed metadata -> the dependency closure of moe-spec-compile[dev] -> `name==version` lines

    python .ci/constraints.py --write constraints.txt   # pin what this environment has (after a green suite)
    python .ci/constraints.py --diff constraints.txt    # what this environment has that the pins do not say

Run it with the interpreter of the environment to read (`.venv/bin/python .ci/constraints.py ...`).
Only the closure is written (a machine's unrelated packages stay out), with markers evaluated for this
interpreter; the package's own metadata keeps ranges (pyproject.toml), the pins live in constraints.txt.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT_DIST = "moe-spec-compile"
ROOT_EXTRAS = ("dev",)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = ROOT_DIST, extras=ROOT_EXTRAS) -> dict[str, str]:
    """{normalized name: installed version} of every distribution root[extras] needs here (root excluded)."""
    seen: dict[str, str] = {}
    todo = [(root, tuple(extras))]
    env = default_environment()
    while todo:
        name, wanted = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency this environment does not have
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in ("", *wanted)):
                continue
            key = _norm(req.name)
            if key in seen or key == _norm(root):
                continue
            try:
                seen[key] = md.version(req.name)
            except md.PackageNotFoundError:
                continue
            todo.append((req.name, tuple(req.extras)))
    return seen


def read(path: str) -> dict[str, str]:
    pins = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_norm(name)] = version.strip()
    return pins


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="FILE", help="pin this environment's closure into FILE")
    group.add_argument("--diff", metavar="FILE", help="list where this environment differs from FILE")
    args = p.parse_args(argv)
    have = closure()
    if args.write:
        lines = [f"{name}=={version.split('+')[0]}" for name, version in sorted(have.items())]
        head = ("# Versions `make test` and `make demo` install (pip -c). Written by .ci/constraints.py --write\n"
                f"# on Python {sys.version.split()[0]}; change them on purpose, in a commit that says what was "
                "checked.\n")
        with open(args.write, "w") as f:
            f.write(head + "\n".join(lines) + "\n")
        print(f"{len(lines)} pins written to {args.write}")
        return 0
    pins = read(args.diff)
    rows = [(n, pins.get(n, "-"), have.get(n, "-")) for n in sorted(set(pins) | set(have))
            if pins.get(n) != have.get(n, "-").split("+")[0]]
    print(f"{'package':<28} {'pinned':<16} installed")
    for name, pinned, installed in rows:
        print(f"{name:<28} {pinned:<16} {installed}")
    print(f"{len(rows)} differ from {args.diff}" if rows else f"every version as {args.diff} pins it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
