"""The offline corpus: this Python's standard library source, split into train and held-out by file.

sorted stdlib .py files (tests and site-packages excluded) -> sha1(relative path) -> 1 in 20 held out
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

HELDOUT_EVERY = 20


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("test/", "site-packages/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        files.append(p)
    return files


def is_heldout(path: Path) -> bool:
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = path.relative_to(root).as_posix()
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def split() -> tuple[list[Path], list[Path]]:
    files = stdlib_files()
    return [p for p in files if not is_heldout(p)], [p for p in files if is_heldout(p)]


def read(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]
