"""`moespec profile`: measure the cost model of a target (and drafter) on this device, print predicted next to
measured speedup, save the profile as JSON.

arguments (checked first) -> target + drafter (the bundled pair, or --config NAME with ngram) -> cost.profile()
-> format_profile(): predicted next to measured speedup per config -> the CostModel saved under its key in --out

    moespec profile                                  # the bundled pair on the default device
    moespec profile --config Qwen3MoeConfig --trees 0,2,4 --budgets none,4
"""

from __future__ import annotations

import re

import torch

from ..cost import CostModel, chain_acceptance, profile
from .args import budget_arg, check_device, config_class, new_parser, positive_int, quiet_loading

__all__ = ["main", "format_profile"]


def format_profile(cm: CostModel) -> str:
    """Predicted next to measured speedup per profiled config, and the prediction's error; then per chain or
    TreeSpec config its break-even acceptance beside the measured one, and the best chain length."""
    lines = [f"profile {cm.key}",
             f"AR step {cm.ar_step * 1e3:.2f} ms (host {cm.host_step * 1e3:.2f} ms), draft {cm.draft_level * 1e3:.2f} "
             f"ms per level, bandwidth {cm.bandwidth / 1e9:.1f} GB/s, per-depth acceptance "
             + (", ".join(f"{a:.2f}" for a in cm.alphas) or "-"),
             "verify ms per (N, C): " + "  ".join(f"{k}: {v * 1e3:.2f}" for k, v in cm.verify.items()),
             "experts per layer per pass (recorded): "
             + "  ".join(f"T={t}: {n:.1f}" for t, n in cm.expert_counts.items()) + f" of {cm.model.num_experts}",
             "",
             f"{'config':<18} {'tok/step':>8} {'step ms':>8} {'pred ms':>8} {'measured':>9} {'predicted':>9} "
             f"{'error':>7}"]
    for key, m in cm.measured.items():
        err = (m["predicted_speedup"] - m["speedup"]) / m["speedup"]
        lines.append(f"{key:<18} {m['tokens_per_step']:>8.2f} {m['step_s'] * 1e3:>8.2f} "
                     f"{m['predicted_step_s'] * 1e3:>8.2f} {m['speedup']:>8.2f}x {m['predicted_speedup']:>8.2f}x "
                     f"{err:>+7.0%}")
    closed = []  # the closed forms of the same model
    for key, m in cm.measured.items():
        name, c = key.split(",")
        shape = _tree_spec(name)
        if shape is None:
            continue
        star = cm.break_even_acceptance(shape, None if c == "exact" else int(c))
        have = chain_acceptance(m["tokens_per_step"], min(shape.depth, shape.max_nodes))
        closed.append(f"break-even acceptance: {name}, C={c}: alpha* = "
                      + ("none (loses even at 1)" if star is None else f"{star:.2f}")
                      + f" (measured per-depth acceptance {'-' if have is None else f'{have:.2f}'})")
    if cm.alphas:
        k, k_star = cm.best_chain_length()
        closed.append(f"best chain length: K = {k} (continuous optimum K* = "
                      + ("-" if k_star is None else f"{k_star:.2f}") + ") at acceptance "
                      + ", ".join(f"{a:.2f}" for a in cm.alphas) + " per depth, C=exact")
    lines += [""] + closed if closed else []
    return "\n".join(lines)


def _tree_spec(name: str):
    """'chain4' or 'tree16-4-4' (shape_key) -> its TreeSpec; None for 'ar' and static trees."""
    from ..speculative import TreeSpec

    if m := re.fullmatch(r"chain(\d+)", name):
        return TreeSpec(int(m[1]), int(m[1]), 1)
    if m := re.fullmatch(r"tree(\d+)-(\d+)-(\d+)", name):
        return TreeSpec(*(int(x) for x in m.groups()))
    return None


def _parser():
    p = new_parser("moespec profile", __doc__)
    p.add_argument("--config", type=config_class, metavar="NAME", help="a small random target of this config class "
                   "(default: the bundled pair)")
    p.add_argument("--drafter", choices=("model", "ngram"), default="model",
                   help="model: the bundled draft (ngram with --config)")
    p.add_argument("--trees", default="0;2;4;16,4,4", help="';'-separated shapes: K (a chain, 0: AR) or T,D,K")
    p.add_argument("--budgets", default="none", help="comma-separated budgets C, or none (exact)")
    p.add_argument("--sizes", default="1,2,4,8,16,32,64", help="verify pass sizes N to time")
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--inner", choices=("eager", "inductor"), default=None,
                   help="the backend's inner compiler (default: eager on the CPU, inductor on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="moespec_profile.json", help="JSON file the profile is stored in (by key)")
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    check_device(p, args.device)
    try:
        trees = [tuple(int(x) for x in t.split(",")) if "," in t else int(t) for t in args.trees.split(";") if t]
        budgets = [budget_arg(b) for b in args.budgets.split(",") if b]
        sizes = [positive_int(s) for s in args.sizes.split(",") if s]
    except Exception as exc:  # argparse.ArgumentTypeError or ValueError: one line, exit 2
        p.error(str(exc))
    from ..speculative import ModelDrafter, NgramDrafter

    if args.config:
        from ..small_models import build_small

        target, draft = build_small(args.config), None
    else:
        from ..tiny import load_tiny

        with quiet_loading():
            target, draft, _ = load_tiny(device="cpu")
    target = target.to(args.device)
    drafter = ModelDrafter(draft.to(args.device)) if draft is not None and args.drafter == "model" else NgramDrafter()
    inner = args.inner or ("eager" if args.device == "cpu" else "inductor")
    cm = profile(target, drafter, trees=trees, budgets=budgets, sizes=sizes, new_tokens=args.new_tokens,
                 repeats=args.repeats, compile_options={"inner": inner})
    print(format_profile(cm))
    cm.save(args.out)
    print(f"\nsaved under {cm.key} in {args.out}")
    return 0
