"""`moespec tune`: time the fused-experts tile configurations per token count, write the tuned table.

arguments -> shapes, token counts, dtype, device (CUDA, or the Triton interpreter) -> kernels/tune.py's tune_shapes
-> one table per shape in --out (kernels/configs/ by default, where kernels/config.py reads them)

    moespec tune --shapes olmoe,qwen3,mixtral,gpt_oss       # on a GPU: four tables in one time-boxed call
    moespec tune --model qwen3-30b-a3b                      # on a GPU: every bucket, full search
    moespec tune --shape 128,2048,768 --k 8 --tokens 1,16,64 --budget 32
    TRITON_INTERPRET=1 moespec tune --shape 6,32,16 --k 2 --tokens 1,8 --dtype float32 --max-configs 2 --out /tmp/t
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..kernels import config as kconfig
from ..kernels.fused_moe import _interpreted
from ..kernels.tune import MODEL_SHAPES, SHAPE_ALIASES, TOKEN_BUCKETS, VERIFY_TOKENS, parse_shapes, tune_shapes

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moespec tune", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", choices=sorted(MODEL_SHAPES), help="a model's expert shape")
    what.add_argument("--shape", help="E,H,I")
    what.add_argument("--shapes", help=f"several models' shapes, e.g. olmoe,qwen3,mixtral,gpt_oss (aliases: "
                                       f"{SHAPE_ALIASES}); one table each, within --time-limit")
    p.add_argument("--k", type=int, help="top-k (default: the model's, else 8)")
    p.add_argument("--tokens", help=f"token counts to tune (default: {','.join(map(str, TOKEN_BUCKETS))}; "
                                    f"with --shapes {','.join(map(str, VERIFY_TOKENS))})")
    p.add_argument("--time-limit", type=float, help="seconds for the whole call (default: none; --shapes: 450)")
    p.add_argument("--budget", type=int, help="experts the routing may use (default: all E)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-configs", type=int, help="time at most this many candidates per token count")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path, default=kconfig.CONFIG_DIR, help="directory of the tables")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.time_limit is not None and args.time_limit <= 0:
        raise ValueError(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    elif args.model:
        shapes = {args.model: MODEL_SHAPES[args.model]}
    else:
        e, h, i = (int(v) for v in args.shape.split(","))
        shapes = {args.shape: (e, h, i, 8, "silu", False)}
    if args.k:
        shapes = {name: (e, h, i, min(args.k, e), *rest) for name, (e, h, i, _, *rest) in shapes.items()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not _interpreted():
        print("moespec tune: no CUDA device; set TRITON_INTERPRET=1 to tune tiny shapes on the CPU", file=sys.stderr)
        return 2
    if kconfig.env_config():
        print(f"moespec tune: unset {kconfig.ENV_VAR}; it would pin every candidate", file=sys.stderr)
        return 2
    tokens = [int(v) for v in args.tokens.split(",")] if args.tokens else list(
        VERIFY_TOKENS if args.shapes else TOKEN_BUCKETS)
    time_limit = args.time_limit if args.time_limit is not None else (450.0 if args.shapes else None)
    tune_shapes(shapes, tokens, getattr(torch, args.dtype), device, args.out, time_limit, args.budget,
                args.max_configs, args.reps)
    return 0
