"""The offline corpus: this Python's standard library source, split into train and held-out by file.

sorted stdlib .py files -> sha1(relative path) -> 1 in 20 held out -> a shipped slice of the held-out files

Excluded: site-packages, the top-level test/ package, idlelib/idle_test and any tests/ folder. Test modules inside
packages (ctypes/test/, unittest/test/, ...) count as ordinary source and stay in.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

HELDOUT_EVERY = 20
SAMPLE_CHARS = 24000  # the shipped held-out slice (heldout_sample.txt)
SAMPLE_FILES = 12  # ... cut from this many held-out files, spread over the sorted list


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


def heldout_sample(texts: list[str], chars: int = SAMPLE_CHARS, files: int = SAMPLE_FILES) -> str:
    """A slice of the held-out split for tests and demos: the start (cut at a line end) of `files` held-out
    files spread evenly over the sorted list, about chars/files characters each (a short file's unused share
    goes to the next ones), joined by blank lines."""
    picked = [texts[i * len(texts) // files] for i in range(min(files, len(texts)))]
    parts, left = [], chars
    for i, text in enumerate(picked):
        cut = text[: left // (len(picked) - i)]
        cut = cut[: cut.rfind("\n") + 1] if len(cut) < len(text) and "\n" in cut else cut
        parts.append(cut)
        left -= len(cut)
    return "\n".join(parts)
