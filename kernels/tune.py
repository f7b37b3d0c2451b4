"""Tuning the fused-experts tile configurations: time every candidate per token count, write the tuned table
(`moespec tune`, commands/tune.py, is its command line).

shape + token counts -> random budgeted routing -> time every candidate of _configs() -> best per T
                     -> kernels/configs/E=..,H=..,I=..,dtype=..,device=...json (config.py reads it)
"""

from __future__ import annotations

import datetime
import random
import statistics
import time
from pathlib import Path

import torch
import triton

from . import config as kconfig
from .fused_moe import _configs, _default_config, _num_sms, fused_experts

__all__ = ["MODEL_SHAPES", "SHAPE_ALIASES", "TOKEN_BUCKETS", "VERIFY_TOKENS", "random_routing", "expert_weights",
           "time_us", "graphed", "tune_shape", "tune_shapes", "parse_shapes"]

# name: (E, H, I, k, activation, interleaved and biased and stored transposed like GPT-OSS)
MODEL_SHAPES = {
    "mixtral-8x7b": (8, 4096, 14336, 2, "silu", False),
    "qwen3-30b-a3b": (128, 2048, 768, 8, "silu", False),
    "olmoe-1b-7b": (64, 2048, 1024, 8, "silu", False),
    "deepseek-v3": (256, 7168, 2048, 8, "silu", False),
    "gpt-oss-20b": (32, 2880, 2880, 4, "swiglu_clamp", True),
}
SHAPE_ALIASES = {"olmoe": "olmoe-1b-7b", "qwen3": "qwen3-30b-a3b", "mixtral": "mixtral-8x7b", "gpt_oss": "gpt-oss-20b",
                 "deepseek": "deepseek-v3"}
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
VERIFY_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # --shapes: the verify passes' sizes, one table per shape


def random_routing(t: int, k: int, e: int, budget: int, gen: torch.Generator, device="cpu"):
    """ids [T, k] int32: each token picks k distinct experts among `budget` random ones (a budgeted
    verify pass); weights [T, k] summing to 1 per token."""
    budget = max(k, min(budget, e))
    pool = torch.randperm(e, generator=gen)[:budget]
    pick = torch.rand(t, budget, generator=gen).argsort(dim=1)[:, :k]  # [T, k] distinct per row
    ids = pool[pick].to(torch.int32)
    weights = torch.rand(t, k, generator=gen)
    return ids.to(device), (weights / weights.sum(1, keepdim=True)).to(device)


def expert_weights(e: int, h: int, i: int, dtype, device, gpt_oss: bool = False, seed: int = 0):
    """(w_gate_up [E, 2I, H], w_down [E, H, I], b_gate_up, b_down), random, scaled like trained weights;
    GPT-OSS's are transposed views of [E, H, 2I] / [E, I, H] storage, with biases."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if gpt_oss:
        wgu = torch.randn(e, h, 2 * i, generator=gen, device=device, dtype=dtype).mul_(h**-0.5).transpose(1, 2)
        wd = torch.randn(e, i, h, generator=gen, device=device, dtype=dtype).mul_(i**-0.5).transpose(1, 2)
        bgu = torch.randn(e, 2 * i, generator=gen, device=device, dtype=dtype).mul_(0.1)
        bd = torch.randn(e, h, generator=gen, device=device, dtype=dtype).mul_(0.1)
        return wgu, wd, bgu, bd
    wgu = torch.randn(e, 2 * i, h, generator=gen, device=device, dtype=dtype).mul_(h**-0.5)
    wd = torch.randn(e, h, i, generator=gen, device=device, dtype=dtype).mul_(i**-0.5)
    return wgu, wd, None, None


def time_us(fn, reps: int = 50, warmup: int = 5) -> list[float]:
    """Per-call times in microseconds: CUDA events on a GPU (after `warmup` calls), wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return times


def graphed(fn, device, try_graph: bool = True):
    """(callable, "graph") replaying fn from a CUDA graph, or (fn, "eager") off CUDA or where fn does not
    capture (host syncs, data-dependent shapes). Verify passes replay graphs, so their timings leave out
    the launch overhead that an eager call would add."""
    if not (try_graph and torch.device(device).type == "cuda"):
        return fn, "eager"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture stream: compiles, allocates workspaces
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, "graph"
    except Exception:  # host syncs (transformers' eager loop calls nonzero()), dynamic shapes
        torch.cuda.synchronize()
        return fn, "eager"


def _candidates(t: int, k: int, e: int, h: int, i: int, dtype, device, max_configs: int | None):
    """The defaults first, then _configs() without M tiles far larger than the pairs per expert."""
    default = _default_config(t, k, e, h, i, dtype, _num_sms(device))
    per_expert = t * k / max(1, min(e, t * k))
    cands = [c for c in _configs(dtype) if c["BLOCK_M"] <= max(16, 2 * triton.next_power_of_2(int(per_expert)))]
    cands = [c for c in cands if c != default]
    random.Random(0).shuffle(cands)  # a search cut short by a time box still samples the whole space
    cands = [default] + cands
    if max_configs is not None and len(cands) > max_configs:
        cands = cands[:max_configs]
    return cands


def tune_shape(e, h, i, k, tokens, dtype, device, budget=None, activation="silu", gpt_oss=False,
               max_configs=None, reps=20, log=print, deadline=None, info=None) -> dict[int, dict[str, int]]:
    """{T: fastest config} over the candidates, timed on random routing with `budget` experts.

    deadline (time.monotonic): each T gets an equal share of the time left and stops timing candidates
    when its share is spent (the defaults, timed first, always count). info, when given, receives
    {T: {"us": best median us, "timed": candidates timed}}."""
    wgu, wd, bgu, bd = expert_weights(e, h, i, dtype, device, gpt_oss)
    gen = torch.Generator().manual_seed(0)
    table = {}
    for index, t in enumerate(tokens):
        x = torch.randn(t, h, generator=gen).to(device=device, dtype=dtype)
        ids, tw = random_routing(t, k, e, budget or e, gen, device)
        best, timed = None, 0
        share = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / (len(tokens) - index)
        for cfg in _candidates(t, k, e, h, i, dtype, device, max_configs):
            if share is not None and best is not None and time.monotonic() > share:
                break
            timed += 1
            args = (x, ids, tw, wgu, wd, activation, bgu, bd, gpt_oss)
            run = lambda args=args, cfg=cfg: fused_experts(*args, config=cfg)
            try:
                replay, _ = graphed(run, device)
                us = statistics.median(time_us(replay, reps=reps, warmup=2))
            except Exception as err:  # a config the device cannot run (shared memory, registers)
                log(f"  T={t} skip {cfg}: {type(err).__name__}")
                continue
            if best is None or us < best[0]:
                best = (us, cfg)
        if best is None:
            raise RuntimeError(f"no configuration ran for T={t}")
        log(f"T={t:4d} {best[0]:10.1f} us  {best[1]}  ({timed} timed)")
        table[t] = best[1]
        if info is not None:
            info[t] = {"us": round(best[0], 2), "timed": timed}
    return table


def parse_shapes(text: str) -> dict[str, tuple]:
    """'olmoe,qwen3,mixtral,gpt_oss' (aliases or MODEL_SHAPES names) -> {name: shape}."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name = SHAPE_ALIASES.get(item, item)
        if name not in MODEL_SHAPES:
            raise ValueError(f"--shapes: unknown shape {item!r}; expected names of {sorted(MODEL_SHAPES)} or "
                             f"aliases {sorted(SHAPE_ALIASES)}")
        out[name] = MODEL_SHAPES[name]
    if not out:
        raise ValueError("--shapes: name at least one shape")
    return out


def tune_shapes(shapes: dict, tokens, dtype, device, out: Path, time_limit: float | None, budget=None,
                max_configs=None, reps=20, log=print) -> list[Path]:
    """One table per shape {name: (E, H, I, k, activation, gpt_oss)} in `out`, all within time_limit seconds
    (each shape an equal share of the time left; None: no limit); each table is written as soon as it is done."""
    deadline = None if time_limit is None else time.monotonic() + time_limit
    name = kconfig.device_name(device)
    paths = []
    for index, (model, (e, h, i, k, activation, gpt_oss)) in enumerate(shapes.items()):
        share = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / (len(shapes) - index)
        log(f"tuning {model}: E={e} H={h} I={i} k={k} {dtype} on {name}"
            + ("" if share is None else f", for {share - time.monotonic():.0f} s"))
        info: dict = {}
        table = tune_shape(e, h, i, k, tokens, dtype, device, budget, activation, gpt_oss, max_configs, reps, log,
                           deadline=share, info=info)
        path = kconfig.table_path(name, e, h, i, dtype, out)
        kconfig.write_table(path, table, _table_meta(name, e, h, i, k, dtype, budget, model=model, timings=info,
                                                     time_limit_s=time_limit))
        log(f"wrote {path}")
        paths.append(path)
    return paths


def _table_meta(device_name, e, h, i, k, dtype, budget, **extra) -> dict:
    return dict(device=device_name, E=e, H=h, I=i, k=k, dtype=str(dtype).removeprefix("torch."), budget=budget or e,
                torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra)
