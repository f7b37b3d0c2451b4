"""Tile configurations of the fused-experts kernels: pinned by an env var, tuned tables, or defaults.

MOESPEC_KERNEL_CONFIG pins one configuration for every call, e.g.
    MOESPEC_KERNEL_CONFIG="BLOCK_M=16,BLOCK_N=64,BLOCK_K=128,SPLIT_K=1,num_warps=4,num_stages=4"
Keys left out keep the value the table or the defaults would have chosen.

Tuned tables are JSON files in kernels/configs/, one per device and shape, named
    E={E},H={H},I={I},dtype={dtype},device={device}.json
holding {"configs": {"<tokens>": {config}, ...}}; a call with T tokens uses the bucket closest to T.
`moespec tune` writes them (kernels/tune.py).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch

__all__ = ["ENV_VAR", "KEYS", "CONFIG_DIR", "parse_config", "device_name", "table_path", "load_table", "pick_bucket",
           "write_table", "table_generation"]

ENV_VAR = "MOESPEC_KERNEL_CONFIG"
KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_GENERATION = 0  # tables written by this process (write_table bumps it)


def parse_config(text: str) -> dict[str, int]:
    """'BLOCK_M=16,BLOCK_N=64' -> {'BLOCK_M': 16, 'BLOCK_N': 64}; unknown keys are an error."""
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in KEYS:
            raise ValueError(f"{ENV_VAR}: bad item {item!r}; expected KEY=INT with KEY in {KEYS}")
        out[key] = int(value)
    return out


def check_config(cfg: dict[str, int]) -> dict[str, int]:
    """Every key present, tiles powers of two >= 16 (tl.dot's minimum), SPLIT_K >= 1."""
    missing = [key for key in KEYS if key not in cfg]
    if missing:
        raise ValueError(f"kernel config {cfg} lacks {missing}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = cfg[key]
        if v < 16 or v & (v - 1):
            raise ValueError(f"kernel config {key}={v}: must be a power of two >= 16")
    if cfg["SPLIT_K"] < 1 or cfg["num_warps"] < 1 or cfg["num_stages"] < 1:
        raise ValueError(f"kernel config {cfg}: SPLIT_K, num_warps and num_stages must be >= 1")
    return {key: int(cfg[key]) for key in KEYS}


def env_config() -> dict[str, int]:
    text = os.environ.get(ENV_VAR, "")
    return parse_config(text) if text else {}


def device_name(device: torch.device) -> str:
    """A file-name-safe device name: 'NVIDIA_H100_80GB_HBM3', or 'cpu' (the Triton interpreter)."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^A-Za-z0-9.-]+", "_", torch.cuda.get_device_name(device)).strip("_")


def table_path(device: str, e: int, h: int, i: int, dtype: torch.dtype, config_dir: Path | None = None) -> Path:
    dtype_name = str(dtype).removeprefix("torch.")
    return Path(config_dir or CONFIG_DIR) / f"E={e},H={h},I={i},dtype={dtype_name},device={device}.json"


@functools.lru_cache(maxsize=64)
def _read_table(path: str) -> dict[int, dict[str, int]] | None:
    p = Path(path)
    if not p.is_file():
        return None
    data = json.loads(p.read_text())
    return {int(tokens): check_config(cfg) for tokens, cfg in data["configs"].items()}


def load_table(device: str, e: int, h: int, i: int, dtype: torch.dtype, config_dir: Path | None = None):
    """{tokens: config} for this device and shape, or None."""
    return _read_table(str(table_path(device, e, h, i, dtype, config_dir)))


def pick_bucket(table: dict[int, dict[str, int]], num_tokens: int) -> dict[str, int]:
    """The config tuned for the token count closest to num_tokens (ties: the smaller count)."""
    best = min(table, key=lambda tokens: (abs(tokens - num_tokens), tokens))
    return dict(table[best])


def table_generation() -> int:
    """Bumped by every write_table: a cache of lookups that keys on it (fused_moe's) sees a table written later."""
    return _GENERATION


def write_table(path: Path, table: dict[int, dict[str, int]], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**meta, "configs": {str(t): check_config(cfg) for t, cfg in sorted(table.items())}}
    path.write_text(json.dumps(body, indent=1) + "\n")
    _read_table.cache_clear()
    global _GENERATION
    _GENERATION += 1
