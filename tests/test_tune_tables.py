"""Tuned tile tables: `moespec tune --shapes ...` writes one per expert shape within its time limit, the
launcher's config lookup finds a table by its file name (shape sizes, dtype, device) with no argument
naming it, and MOESPEC_KERNEL_CONFIG still pins. CPU: the kernels under TRITON_INTERPRET=1, tiny shapes.

Legend: T tokens, E experts, k top-k, H hidden, I intermediate.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

from moe_spec_compile.commands.tune import main as tune_command  # noqa: E402
from moe_spec_compile.kernels import config as kconfig  # noqa: E402
from moe_spec_compile.kernels import fused_moe, tune  # noqa: E402
from moe_spec_compile.ops import fused_experts_torch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not fused_moe._interpreted():
    pytest.skip("kernels were imported without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)
DTYPE = torch.float32
SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=2)
LARGE = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, SPLIT_K=1, num_warps=4, num_stages=3)


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """The launcher's default table folder, pointed at an empty tmp dir; no pinned config."""
    monkeypatch.delenv(kconfig.ENV_VAR, raising=False)
    monkeypatch.setattr(kconfig, "CONFIG_DIR", tmp_path)
    fused_moe._select.cache_clear()
    kconfig._read_table.cache_clear()
    yield tmp_path
    fused_moe._select.cache_clear()
    kconfig._read_table.cache_clear()


def _write(e, h, i, table):
    path = kconfig.table_path(kconfig.device_name(DEVICE), e, h, i, DTYPE)
    kconfig.write_table(path, table, dict(model="tiny", E=e, H=h, I=i))
    return path


def test_table_is_found_by_name(config_dir):
    path = _write(6, 32, 16, {1: SMALL, 64: LARGE})
    assert path.parent == config_dir and path.name.startswith("E=6,H=32,I=16,dtype=float32,device=")
    pick = lambda t, e=6: fused_moe.select_config(t, 2, e, 32, 16, DTYPE, DEVICE)
    assert pick(1) == SMALL and pick(20) == SMALL and pick(40) == LARGE and pick(500) == LARGE
    other = fused_moe._default_config(3, 2, 8, 32, 16, DTYPE, fused_moe._num_sms(DEVICE))
    assert pick(3, e=8) == other  # no table for E=8: the defaults


def test_a_table_written_after_a_lookup_is_seen(config_dir):
    """The launcher's cached lookup keys on config.table_generation(): write_table need not know the launcher."""
    pick = lambda: fused_moe.select_config(20, 2, 6, 32, 16, DTYPE, DEVICE)
    assert pick() == fused_moe._default_config(20, 2, 6, 32, 16, DTYPE, fused_moe._num_sms(DEVICE)) != LARGE
    _write(6, 32, 16, {16: LARGE})
    assert pick() == LARGE


def test_env_var_pins_over_the_table(config_dir, monkeypatch):
    _write(6, 32, 16, {1: SMALL})
    monkeypatch.setenv(kconfig.ENV_VAR, "BLOCK_M=32,SPLIT_K=4")
    assert fused_moe.select_config(1, 2, 6, 32, 16, DTYPE, DEVICE) == dict(SMALL, BLOCK_M=32, SPLIT_K=4)


def test_launcher_runs_the_tables_config(config_dir, monkeypatch):
    """fused_experts itself takes the table's BLOCK_M (seen by the routing alignment) and stays exact."""
    _write(6, 32, 16, {4: LARGE})
    seen = []
    align = fused_moe.align_by_expert
    monkeypatch.setattr(fused_moe, "align_by_expert", lambda ids, e, bm: seen.append(bm) or align(ids, e, bm))
    wgu, wd, _, _ = tune.expert_weights(6, 32, 16, DTYPE, DEVICE)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=gen).to(DEVICE)
    ids, tw = tune.random_routing(4, 2, 6, 6, gen, DEVICE)
    out = fused_moe.fused_experts(x, ids, tw, wgu, wd)
    assert seen == [LARGE["BLOCK_M"]]
    torch.testing.assert_close(out, fused_experts_torch(x, ids, tw, wgu, wd), rtol=1e-4, atol=1e-4)


def test_tune_shapes_writes_one_table_per_shape_in_its_time(tmp_path, monkeypatch):
    """A time limit too short for any search still leaves every T its defaults (timed first), per shape."""
    monkeypatch.delenv(kconfig.ENV_VAR, raising=False)
    shapes = {"tiny-silu": (6, 32, 16, 2, "silu", False), "tiny-gpt-oss": (4, 32, 32, 2, "swiglu_clamp", True)}
    paths = tune.tune_shapes(shapes, [1, 4], DTYPE, DEVICE, tmp_path, time_limit=0.01, reps=1, log=lambda *_: None)
    assert [p.name.split(",dtype")[0] for p in paths] == ["E=6,H=32,I=16", "E=4,H=32,I=32"]
    for path, (name, (e, h, i, k, _, _)) in zip(paths, shapes.items()):
        body = json.loads(path.read_text())
        assert body["model"] == name and body["k"] == k and body["time_limit_s"] == 0.01
        assert sorted(body["configs"]) == ["1", "4"] and all(v["timed"] == 1 for v in body["timings"].values())
        default = fused_moe._default_config(1, k, e, h, i, DTYPE, fused_moe._num_sms(DEVICE))
        assert body["configs"]["1"] == default


def test_shapes_names():
    shapes = tune.parse_shapes("olmoe,qwen3,mixtral,gpt_oss")
    assert {name: s[:4] for name, s in shapes.items()} == {
        "olmoe-1b-7b": (64, 2048, 1024, 8), "qwen3-30b-a3b": (128, 2048, 768, 8),
        "mixtral-8x7b": (8, 4096, 14336, 2), "gpt-oss-20b": (32, 2880, 2880, 4)}
    assert shapes["gpt-oss-20b"][4:] == ("swiglu_clamp", True)
    with pytest.raises(ValueError, match="--shapes"):
        tune.parse_shapes("olmoe,llama")
    with pytest.raises(ValueError, match="--time-limit"):
        tune_command(["--shapes", "olmoe", "--time-limit", "0"])
