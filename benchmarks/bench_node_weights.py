"""How should a draft tree's nodes weigh in the budget's expert scores? Mean accepted length and greedy
agreement of speculative decoding on the bundled pair, per node-weights option, next to exact decoding.

bundled target + draft -> held-out prompts -> greedy SpeculativeDecoder(node_weights=...) under C = E/4, E/8
(E read from the config) for a chain and a tree ->
  free-running: mean accepted length, greedy agreement of the new tokens with exact decoding
  teacher-forced: along exact decoding's own steps, each drafted tree verified once more under C per option:
  accepted length on the same tree, and how often the budgeted argmax equals the exact one on the nodes exact
  decoding accepted (root included). Free-running agreement is dominated by the first divergence; the
  teacher-forced figures compare the options on identical passes.

    python -P benchmarks/bench_node_weights.py [--prompts 8] [--new-tokens 32] [--out PATH_WITHOUT_EXTENSION]

The options (moe_spec_compile/speculative/weights.py): "uniform" (every node 1), "path" (the draft's path
probability), "depth" (DEPTH_DECAY ** depth); padding rows weigh 0 in all of them. Writes <out>.json and <out>.md
with the machine, versions, date, command and load; the best option (greedy agreement with exact decoding over
the budgeted rows, then accepted length relative to exact) is what DEFAULT_NODE_WEIGHTS should be.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import moe_spec_compile as msc
from moe_spec_compile.quality import greedy_agreement, speculative_run
from moe_spec_compile.speculative.accept import SamplingConfig, accept_greedy
from moe_spec_compile.speculative.weights import DEFAULT_NODE_WEIGHTS, NODE_WEIGHTS
from moe_spec_compile.tiny import prompts_and_heldout


def trees(max_nodes: int):
    """A chain of 4 and an EAGLE-2 style tree of max_nodes drafted nodes (16 to 32 make sense)."""
    depth = 5
    return [("chain 4", msc.TreeSpec(4, 4, 1)), (f"tree {max_nodes}", msc.TreeSpec(max_nodes, depth, 4))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    p.add_argument("--prompt-len", type=int, default=48, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per prompt")
    p.add_argument("--tree-nodes", type=int, default=24, help="drafted nodes of the tree (the chain has 4)")
    p.add_argument("--policy", default="substitute", choices=("substitute", "truncate"))
    p.add_argument("--out", default="benchmarks/results/node_weights_cpu", help="output path without extension")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    target, draft, tok = msc.load_tiny()
    e, k = target.config.num_experts, target.config.num_experts_per_tok
    budgets = sorted({max(e // 4, k), max(e // 8, k)}, reverse=True)
    prompts, _ = prompts_and_heldout(tok, args.prompts, args.prompt_len)
    compiled = torch.compile(target, backend="moespec", dynamic=False, options={"inner": "eager"})
    rows, load = [], [os.getloadavg()[0]]
    for tree_name, shape in trees(args.tree_nodes):
        dec = msc.SpeculativeDecoder(compiled, drafter=msc.ModelDrafter(draft), tree=shape, policy=args.policy)
        speculative_run(dec, prompts[:1], None, 8)  # warm-up: compiles this tree's buckets, untimed
        exact, summary = speculative_run(dec, prompts, None, args.new_tokens)
        forced = teacher_forced(dec, prompts, budgets, args.new_tokens)
        rows.append(dict(tree=tree_name, budget=None, node_weights="-", agreement=1.0, **summary,
                         **forced[None]))
        print(rows[-1], flush=True)
        for c in budgets:
            for option in NODE_WEIGHTS:
                dec.node_weights = option
                outs, summary = speculative_run(dec, prompts, c, args.new_tokens)
                rows.append(dict(tree=tree_name, budget=c, node_weights=option,
                                 agreement=greedy_agreement(exact, outs), **summary, **forced[c, option]))
                load.append(os.getloadavg()[0])
                print(rows[-1], flush=True)
    best = _best(rows)
    meta = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M"), command="python -P " + " ".join(sys.argv),
                load_average=[round(x, 2) for x in (min(load), max(load))], experts=e, top_k=k,
                layers=target.config.num_hidden_layers, prompts=args.prompts, prompt_len=args.prompt_len,
                new_tokens=args.new_tokens, policy=args.policy, best=best, default=DEFAULT_NODE_WEIGHTS)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = _markdown(meta, rows)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


@torch.no_grad()
def teacher_forced(dec, prompts, budgets, new_tokens: int) -> dict:
    """Along exact decoding: each step's tree verified under every (C, option), then exactly (whose KV and
    acceptance move on). -> {None: exact figures, (C, option): figures}: forced_accepted (tokens per verify,
    bonus included, greedy acceptance on the same tree), forced_agreement (budgeted argmax == exact argmax on
    exact's accepted path and its bonus position)."""
    keys = [(c, o) for c in budgets for o in NODE_WEIGHTS]
    acc = {k: 0 for k in [None, *keys]}
    same = {k: 0 for k in keys}
    steps = positions = 0
    for prompt in prompts:
        ids = prompt.reshape(1, -1).to(dec.device)
        dec.begin(ids, None, new_tokens, dec.tree, SamplingConfig(), drafting=True)
        emitted = 1
        while emitted < new_tokens:
            tree = dec.drafter.draft(dec.roots, dec.tree, dec.live)
            budgeted = {}
            for c, option in keys:  # before the exact pass: the exact pass's KV is what accept() keeps
                dec.node_weights = option
                budgeted[c, option] = dec.verify(tree, c)[0][0].argmax(-1)
            logits, _ = dec.verify(tree, None)
            tree, anc, live = dec._tree, dec._anc, torch.ones(1, dtype=torch.bool)
            result = dec.accept(tree, logits, SamplingConfig())
            exact_argmax = logits[0].argmax(-1)
            path = torch.tensor(result.paths[0])
            for key, argmax in budgeted.items():
                acc[key] += len(accept_greedy(tree, _one_hot(argmax, logits[0])[None], anc, live).paths[0])
                same[key] += int((argmax[path] == exact_argmax[path]).sum())
            acc[None] += len(path)
            steps += 1
            positions += len(path)
            emitted += len(path)
            dec.roots = result.bonus
    out = {None: dict(forced_accepted=acc[None] / steps, forced_agreement=1.0)}
    out.update({k: dict(forced_accepted=acc[k] / steps, forced_agreement=same[k] / positions) for k in keys})
    return out


def _one_hot(argmax: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax is `argmax` (greedy acceptance reads only the argmax)."""
    return torch.zeros_like(like).scatter_(-1, argmax[:, None], 1.0)


def _best(rows) -> str:
    """The option with the highest teacher-forced agreement with exact decoding over the budgeted rows, then the
    highest teacher-forced accepted length. Agreement comes first: a budget that degrades the target's output
    can make it easier to draft for (accepted length up, quality down)."""
    totals = {}
    for r in rows:
        if r["budget"] is not None:
            agree, acc = totals.get(r["node_weights"], (0.0, 0.0))
            totals[r["node_weights"]] = (agree + r["forced_agreement"], acc + r["forced_accepted"])
    return max(totals, key=lambda o: (round(totals[o][0], 3), totals[o][1]))


def _markdown(meta, rows) -> list[str]:
    lines = [f"# Node weights for the budget's expert scores (bundled pair: target E={meta['experts']}, "
             f"top-{meta['top_k']}, {meta['layers']} layers)", "",
             f"{meta['date']}, {meta['machine']} ({meta['cpus']} CPUs), torch {meta['torch']}, load "
             f"{meta['load_average'][0]}-{meta['load_average'][1]}; `{meta['command']}`", "",
             f"Greedy, policy {meta['policy']}, {meta['prompts']} held-out prompts of {meta['prompt_len']} tokens, "
             f"{meta['new_tokens']} new tokens each. Padding rows weigh 0 in every option.", "",
             "- free-running: accepted = tokens per verify pass (bonus included); agreement = new tokens equal to "
             "exact decoding's, position by position (one early divergence changes everything after it);",
             "- teacher-forced: along exact decoding's steps, each drafted tree verified under C: accepted = tokens "
             "per verify (greedy acceptance on the same tree); agreement = budgeted argmax equal to exact's on the "
             "nodes exact decoding accepted (root included).", "",
             "| tree | C | node weights | accepted | agreement | forced accepted | forced agreement "
             "| experts/layer | budget bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bound = "-" if r["budget_bound"] is None else f"{100 * r['budget_bound']:.0f}%"
        lines.append(f"| {r['tree']} | {r['budget'] or 'exact'} | {r['node_weights']} | {r['mean_accepted']:.3f} "
                     f"| {100 * r['agreement']:.1f}% | {r['forced_accepted']:.3f} "
                     f"| {100 * r['forced_agreement']:.1f}% | {r['verify_experts_per_layer'] or float('nan'):.2f} "
                     f"| {bound} |")
    lines += ["", f"Best (teacher-forced agreement over the budgeted rows, then teacher-forced accepted length): "
              f"**{meta['best']}** (the package default when this ran: {meta['default']})."]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
