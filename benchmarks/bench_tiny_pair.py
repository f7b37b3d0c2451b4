"""The bundled pair against another (e.g. the previous one): what issue 12's retraining changed.

checkpoint folders (load_tiny(root=...)) -> per pair, in one process, interleaved repeats: tokens/s of
transformers' greedy generate, its assisted generation with the pair's draft, and moespec's static configs
(chain 4 and a 16-node tree with the draft, exact and at C = E/4) -> speedups over greedy measured side by
side -> held-out argmax agreement with the exact pass at C = E/4 (32-token windows) -> a markdown table

    python -P benchmarks/bench_tiny_pair.py --pairs old=/tmp/tiny_old,new=bundled \
        --out benchmarks/results/tiny_before_after.md

Every moespec row must reproduce greedy's tokens when exact (checked; a mismatch is printed). Timings are
medians of --repeats runs after a warm-up; `uptime` is recorded before and after, since the machine's load
moves absolute tokens/s (the ratios, taken within one repeat, move much less).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from moe_spec_compile.quality import score_windows
from moe_spec_compile.speculative import ModelDrafter, SpeculativeDecoder, TreeSpec
from moe_spec_compile.tiny import heldout_text, load_tiny


def _prompts(tok, root, n: int, length: int):
    text = (Path(root) / "heldout_sample.txt").read_text(encoding="utf-8") if root else heldout_text()
    ids = torch.tensor(tok(text)["input_ids"])
    stride = ids.numel() // (n + 1)
    return [ids[i * stride : i * stride + length][None] for i in range(n)], ids[n * stride :]


class Pair:
    def __init__(self, name: str, root: str | None, args):
        self.name, self.root = name, root
        self.target, self.draft, self.tok = load_tiny(root=root)
        cfg = self.target.config
        self.e, self.k = cfg.num_experts, cfg.num_experts_per_tok
        self.c = self.e // 4
        self.prompts, self.heldout = _prompts(self.tok, root, args.prompts, args.prompt_len)
        self.new = args.new_tokens
        drafter = ModelDrafter(self.draft)
        self.rows = {
            "greedy": self._hf(),
            "assisted": self._hf(assistant_model=self.draft),
        }
        for label, tree in (("chain 4", 4), ("tree 16", TreeSpec(16, 4, 4))):
            dec = SpeculativeDecoder(self.target, drafter=drafter, tree=tree, compile=True,
                                     compile_options={"inner": "eager"})
            self.rows[f"moespec {label}"] = self._spec(dec, None)
            self.rows[f"moespec {label} C={self.c}"] = self._spec(dec, self.c)
        self.times = {k: [] for k in self.rows}
        self.outs = {}

    def _hf(self, **kw):
        def run():
            return [self.target.generate(p, max_new_tokens=self.new, min_new_tokens=self.new, do_sample=False,
                                         pad_token_id=0, eos_token_id=None, **kw)[0, p.shape[1]:] for p in self.prompts]
        return run

    def _spec(self, dec, c):
        def run():
            return [dec.generate(p, max_new_tokens=self.new, budget=c, eos_token_id=None).sequences[0, p.shape[1]:]
                    for p in self.prompts]
        return run

    def once(self, record: bool) -> None:
        for name, fn in self.rows.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                outs = fn()
            dt = time.perf_counter() - t0
            if record:
                self.times[name].append(sum(o.numel() for o in outs) / dt)
                self.outs[name] = outs

    def agreement(self) -> float:
        exact = score_windows(self.target, self.heldout, 32, None, max_windows=32)
        under = score_windows(self.target, self.heldout, 32, self.c, max_windows=32)
        return float((exact.predictions == under.predictions).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", default="bundled=bundled", help="name=folder,... ('bundled': the package's pair)")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    up0 = os.popen("uptime").read().strip()
    pairs = []
    for item in args.pairs.split(","):
        name, _, root = item.partition("=")
        pairs.append(Pair(name, None if root in ("", "bundled") else root, args))
    for pair in pairs:
        pair.once(record=False)  # warm-up: compiles the verify buckets
    for _ in range(args.repeats):
        for pair in pairs:  # interleaved, so load changes hit every pair alike
            pair.once(record=True)
    up1 = os.popen("uptime").read().strip()
    lines = [f"# Bundled pairs side by side ({datetime.date.today()})", "",
             f"`python -P benchmarks/bench_tiny_pair.py --pairs {args.pairs}`; {args.prompts} held-out prompts of "
             f"{args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, CPU ({platform.processor() or 'cpu'}, "
             f"2 threads), torch {torch.__version__}, transformers {transformers.__version__}; medians of "
             f"{args.repeats} interleaved repeats after a warm-up. moespec rows compile the target with "
             f"backend=\"moespec\" (inner eager).", "", f"- load before: `{up0}`", f"- load after: `{up1}`", ""]
    for pair in pairs:
        g = statistics.median(pair.times["greedy"])
        lines += [f"## {pair.name}: {pair.root or 'bundled'} (E={pair.e}, top-{pair.k}, C=E/4={pair.c})", "",
                  "| row | tok/s (median) | over greedy | over assisted | same tokens as greedy |",
                  "|---|---|---|---|---|"]
        a = statistics.median(pair.times["assisted"])
        for name, ts in pair.times.items():
            m = statistics.median(ts)
            same = sum(int(torch.equal(x, y)) for x, y in zip(pair.outs[name], pair.outs["greedy"]))
            lines.append(f"| {name} | {m:.1f} | {m / g:.2f}x | {m / a:.2f}x | {same}/{len(pair.prompts)} |")
        lines += ["", f"Held-out argmax agreement with the exact pass at C = {pair.c} (32-token windows): "
                  f"{pair.agreement():.1%}", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
