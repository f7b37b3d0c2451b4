"""Decoding speed of this checkout against another commit, side by side in one run (issue 22: the one decoding core
must keep batch-1 tok/s within 3% of the code before it, and batched tok/s no lower).

    python -P benchmarks/bench_ab.py --old 02faf0f [--rounds 7 --new-tokens 64]

The old commit is checked out in a temporary git worktree; two worker processes (one per tree, each importing its
own moe_spec_compile ahead of the installed one) build the same decoders on the bundled pair (compile=True, as the
README builds them), warm them up, then time one generate per config per round, alternating which tree goes first.
Greedy outputs are compared token for token between the trees. Reports per config the median tok/s of each tree and
the median and range of the per-round ratios new / old, with the machine's load before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time, torch
import moe_spec_compile as msc
from moe_spec_compile.tiny import HERE, heldout_text
torch.manual_seed(0)
target, draft, tok = msc.load_tiny()
ids = torch.tensor(tok(heldout_text())["input_ids"])
new = int(sys.argv[1])
prompts = [ids[i * 997 : i * 997 + 48] for i in range(4)]
def config(name):
    kind, tree, rows, *budget = name.split("/")
    tree = int(tree) if tree.isdigit() else tree if tree == "auto" else msc.TreeSpec(*map(int, tree.split("-")))
    drafter = msc.NgramDrafter() if kind == "ngram" else msc.ModelDrafter(draft) if kind == "model" else \
        msc.Eagle3Drafter.from_pretrained(HERE / "eagle3", target)
    dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=tree, compile=True,
                                 budget=int(budget[0]) if budget else None)
    rows = int(rows)
    if rows == 1:
        args = (prompts[0][None],), {}
    else:
        batch = torch.stack(prompts[:rows])
        args = (batch,), {"attention_mask": torch.ones_like(batch)}
    return dec, args
decs = {}
for name in sys.argv[2:]:
    dec, (a, kw) = decs[name] = config(name)
    for shape, c in dec.controller.configs if dec.controller else ():  # auto: every config it may pick compiles
        dec.generate(*a, max_new_tokens=new, eos_token_id=None, tree=shape, budget=c, **kw)
    for _ in range(4):  # compiles every pass shape the config meets
        dec.generate(*a, max_new_tokens=new, eos_token_id=None, **kw)
import moe_spec_compile.passes as passes
print(json.dumps({"ready": f"{msc.__file__}, {passes.__file__}"}), flush=True)
for line in sys.stdin:
    dec, (a, kw) = decs[line.strip()]
    time.sleep(0.3)  # the other worker's OpenMP threads stop spinning first
    t0 = time.perf_counter()
    out = dec.generate(*a, max_new_tokens=new, eos_token_id=None, **kw)
    dt = time.perf_counter() - t0
    st = out.stats
    phases = {k: getattr(st, "time_" + k, 0.0) / max(st.steps, 1) for k in ("draft", "verify", "accept", "host")}
    print(json.dumps({"s": dt, "tokens": int(out.sequences.shape[0] * new), "seq": out.sequences.tolist(),
                      "phases": phases}), flush=True)
"""

CONFIGS = ["model/0/1", "model/4/1", "model/16-4-4/1", "ngram/4/1", "model/0/4", "model/4/4"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the commit to compare against")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--configs", nargs="+", default=CONFIGS,
                    help="drafter/tree/rows[/budget C]: drafter model | ngram | eagle3 (the shipped head), tree an "
                         "int, a TreeSpec as 16-4-4 or auto; e.g. model/4/1, model/4/1/16, eagle3/auto/1")
    ap.add_argument("--out", type=Path, default=None, help="write the table (markdown) here")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="moespec_ab_"))
    wt = tmp / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(wt), args.old], check=True,
                   capture_output=True)
    for sub in ("passes", "kernels"):  # the package maps these top-level folders in (pyproject's package-dir):
        # without the links the old tree's moe_spec_compile.passes would come from the editable install, the new tree
        (wt / "moe_spec_compile" / sub).symlink_to(wt / sub, target_is_directory=True)
    try:
        workers = {}
        for name, tree in (("old", wt), ("new", ROOT)):
            env = {**os.environ, "PYTHONPATH": str(tree)}
            workers[name] = subprocess.Popen([sys.executable, "-P", "-c", WORKER, str(args.new_tokens), *args.configs],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                             cwd=str(tmp))
        for name, w in workers.items():
            ready = json.loads(w.stdout.readline())
            print(f"{name}: {ready['ready']}", flush=True)
        times = {c: {"old": [], "new": []} for c in args.configs}
        phases = {c: {"old": [], "new": []} for c in args.configs}
        same = {c: True for c in args.configs}
        for r in range(args.rounds):
            for c in args.configs:
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                seqs = {}
                for name in order:
                    w = workers[name]
                    w.stdin.write(c + "\n")
                    w.stdin.flush()
                    res = json.loads(w.stdout.readline())
                    times[c][name].append(res["tokens"] / res["s"])
                    phases[c][name].append(res["phases"])
                    seqs[name] = res["seq"]
                same[c] &= seqs["old"] == seqs["new"]
        for w in workers.values():
            w.stdin.close()
            w.wait()
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], capture_output=True)
    load_after = os.getloadavg()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    lines = [f"old = {args.old}, new = working tree at {head}; {args.rounds} rounds, {args.new_tokens} new tokens "
             f"per row, greedy, bundled pair, compile=True; load average before {load_before[0]:.2f}, after "
             f"{load_after[0]:.2f}", "", "| config (drafter/tree/rows) | old tok/s | new tok/s | new/old median "
             "[min, max] | same tokens |", "|---|---|---|---|---|"]
    for c in args.configs:
        o, n = times[c]["old"], times[c]["new"]
        ratios = sorted(b / a for a, b in zip(o, n))
        lines.append(f"| {c} | {statistics.median(o):.1f} | {statistics.median(n):.1f} | "
                     f"{statistics.median(ratios):.3f} [{ratios[0]:.3f}, {ratios[-1]:.3f}] | {same[c]} |")
    lines += ["", "Per verify step, ms (medians over rounds; old -> new):", ""]
    for c in args.configs:
        med = {v: {k: 1e3 * statistics.median(p[k] for p in phases[c][v]) for k in phases[c][v][0]}
               for v in ("old", "new")}
        lines.append(f"- {c}: " + ", ".join(f"{k} {med['old'][k]:.2f} -> {med['new'][k]:.2f}" for k in med["old"]))
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
