"""`make demo` / `moespec demo`: the bundled tiny MoE under a range of expert budgets.

load_tiny() -> explain table -> speculative decoding of held-out prompts (draft model, dynamic tree)
without a budget and with budgets C -> table (tokens/s, accepted length, experts per layer per verify,
agreement with the target's greedy output, held-out argmax agreement and accuracy under C)
-> PNG of quality vs experts loaded
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import moe_spec_compile as msc

from .quality import QualityRow, evaluate


def prompts_and_heldout(tokenizer, n_prompts: int, prompt_len: int):
    """Prompts cut from the held-out slice (files the models never trained on), and the rest for scoring."""
    from .tiny import heldout_text

    ids = torch.tensor(tokenizer(heldout_text())["input_ids"])
    stride = ids.numel() // (n_prompts + 1)
    prompts = [ids[i * stride : i * stride + prompt_len] for i in range(n_prompts)]
    return prompts, ids[n_prompts * stride :]


def table(rows: list[QualityRow]) -> str:
    head = f"{'budget':>7} {'tok/s':>7} {'accepted':>9} {'experts/layer':>14} {'bound':>6} {'agree':>7} " \
           f"{'same argmax':>12} {'held-out acc':>13} {'held-out loss':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        bound = "-" if r.budget_bound is None else f"{r.budget_bound:.0%}"
        lines.append(f"{'exact' if r.budget is None else r.budget:>7} {r.tokens_per_s:>7.1f} {r.mean_accepted:>9.2f} "
                     f"{r.verify_experts_per_layer:>14.1f} {bound:>6} {r.agreement:>7.1%} {r.heldout_agreement:>12.1%} "
                     f"{r.heldout_accuracy:>13.1%} "
                     f"{r.heldout_loss:>14.3f}")
    return "\n".join(lines)


def plot(rows: list[QualityRow], path: Path, num_experts: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r.verify_experts_per_layer)  # the exact run loads the most experts
    xs = [r.verify_experts_per_layer for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.plot(xs, [r.heldout_accuracy for r in rows], "o-", label="held-out next-token accuracy (32-token passes)")
    ax.plot(xs, [r.heldout_agreement for r in rows], "^-", label="held-out positions with the exact pass's argmax")
    ax.plot(xs, [r.agreement for r in rows], "s-", label="greedy continuation equal to the exact one, by position")
    for r, x in zip(rows, xs):
        ax.annotate("exact" if r.budget is None else f"C={r.budget}", (x, r.heldout_agreement),
                    textcoords="offset points", xytext=(-8, 7), fontsize=8)
    ax.set_xlabel(f"experts loaded per layer per verify pass (of {num_experts})")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("moespec tiny MoE: quality against expert budget")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moespec demo")
    p.add_argument("--budgets", default="4,6,8,12,16", help="comma-separated budgets C (the target has 32 experts)")
    p.add_argument("--policy", default="substitute", choices=("substitute", "truncate"))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--windows", type=int, default=32, help="held-out 32-token passes scored per budget")
    p.add_argument("--out", default="moespec_demo", help="folder for the plot and the JSON rows")
    p.add_argument("--quick", action="store_true", help="a small, fast run (CI): fewer budgets and tokens, eager")
    args = p.parse_args(argv)
    if args.quick:
        args.budgets, args.prompts, args.new_tokens, args.windows = "4,8", 1, 12, 4
    budgets = [int(b) for b in args.budgets.split(",") if b]
    torch.manual_seed(0)
    target, draft, tok = msc.load_tiny()
    prompts, heldout = prompts_and_heldout(tok, args.prompts, args.prompt_len)
    e = target.config.num_experts
    print(f"moespec demo: bundled Qwen3-MoE target ({target.config.num_hidden_layers} layers, {e} experts, "
          f"top-{target.config.num_experts_per_tok}), dense draft, {args.prompts} held-out prompts\n")
    print(msc.explain(target, prompts[0][None], use_cache=False).table(), "\n")
    options = {"inner": "eager"} if args.quick else {}
    rows = evaluate(target, msc.ModelDrafter(draft), prompts, heldout, budgets, policy=args.policy,
                    tree=msc.TreeSpec(total_tokens=16, depth=4, top_k=4), max_new_tokens=args.new_tokens,
                    max_windows=args.windows, compile_options=options)
    print(table(rows))
    out = Path(args.out)
    plot(rows, out / "quality_vs_experts.png", e)
    (out / "rows.json").write_text(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
    print(f"\nwrote {out / 'quality_vs_experts.png'} and {out / 'rows.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
