"""`make demo` / `moespec demo`: the bundled tiny MoE under a range of expert budgets. Did it get faster, and
what did the budget cost?

arguments (checked first) -> load_tiny() -> explain table -> warm-up (compiles each verify bucket)
-> plain decoding (transformers' greedy generate: the baseline) -> speculative decoding without a budget, then
with each budget C, each row printed as it finishes (tokens/s over repeats, speedup over the baseline,
accepted length, experts per layer per verify, agreement with the exact output, held-out quality under C)
-> a PNG with speed beside quality, and the rows as JSON

    moespec demo                    # budgets E/16, E/8, E/4, E/2 against the exact run and plain decoding
    moespec demo --quick --budgets 4,8,16
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..tiny import prompts_and_heldout
from .args import budgets_arg, check_device, new_parser, positive_int, quiet_loading

TREE = (16, 4, 4)  # TreeSpec(total_tokens, depth, top_k) of every speculative row

COLUMNS = """\
columns:
  tok/s         new tokens per second over all prompts: median of the repeats [min-max]
  speedup       tok/s over plain decoding's (median over median) [slowest over fastest baseline - fastest
                over slowest]; > 1 means speculation paid off
  accepted      tokens each verify pass emitted: accepted drafted tokens + the bonus token
  experts       distinct experts per MoE layer per verify pass, mean (the budget caps it; of {e})
  bound         share of verify passes in which some layer used all C experts it was allowed
  agree         new tokens equal to the exact speculative output (= the target's greedy output), by position
  same argmax   held-out positions whose argmax under C equals the exact pass's (teacher-forced form of agree)
  held-out acc  next-token accuracy on held-out text, each 32-token window scored as one pass under C
  held-out loss mean next-token cross-entropy (nats) on the same windows"""


@dataclass
class DemoRow:
    name: str  # "plain", "exact", "C=8", "auto"
    budget: int | str | None
    tokens_per_s: list[float] = field(default_factory=list)  # one per repeat
    speedup: tuple[float, float, float] | None = None  # (median, low, high) against the baseline
    mean_accepted: float | None = None
    verify_experts_per_layer: float | None = None
    budget_bound: float | None = None
    agreement: float | None = None
    heldout_agreement: float | None = None
    heldout_accuracy: float | None = None
    heldout_loss: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# --- the table ------------------------------------------------------------------------------------

HEAD = (f"{'row':>6} {'tok/s':>19} {'speedup':>18} {'accepted':>8} {'experts':>7} {'bound':>5} {'agree':>6} "
        f"{'same argmax':>11} {'held-out acc':>12} {'held-out loss':>13}")


def _fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_row(r: DemoRow) -> str:
    tps = r.tokens_per_s
    speed = f"{statistics.median(tps):6.1f} [{min(tps):.1f}-{max(tps):.1f}]" if tps else "-"
    up = "-" if r.speedup is None else f"{r.speedup[0]:.2f}x [{r.speedup[1]:.2f}-{r.speedup[2]:.2f}]"
    return (f"{r.name:>6} {speed:>19} {up:>18} {_fmt(r.mean_accepted, '.2f', 8)} "
            f"{_fmt(r.verify_experts_per_layer, '.1f', 7)} {_fmt(r.budget_bound, '.0%', 5)} "
            f"{_fmt(r.agreement, '.0%', 6)} {_fmt(r.heldout_agreement, '.1%', 11)} "
            f"{_fmt(r.heldout_accuracy, '.1%', 12)} {_fmt(r.heldout_loss, '.3f', 13)}")


def speedup(tps: list[float], base: list[float]) -> tuple[float, float, float]:
    """(median ratio, worst case, best case) of tokens/s against the baseline's repeats."""
    return statistics.median(tps) / statistics.median(base), min(tps) / max(base), max(tps) / min(base)


def verdict(rows: list[DemoRow]) -> str:
    """One line answering "did it get faster?": the fastest row against plain decoding."""
    timed = [r for r in rows if r.speedup is not None]
    if not timed:
        return "no timed rows"
    best = max(timed, key=lambda r: r.speedup[0])
    median, low, high = best.speedup
    if low > 1:
        words = "faster than plain decoding in every repeat"
    elif high < 1:
        words = "slower than plain decoding in every repeat (see the README: where speculation pays)"
    else:
        words = "within the noise of plain decoding"
    return f"fastest row: {best.name}, {median:.2f}x plain decoding's tokens/s [{low:.2f}-{high:.2f}]: {words}"


def load_warning() -> str | None:
    """A line when the 1-minute load average exceeds the cores: other work then steals time from the runs."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"note: load average {load:.1f} on {cores} cores: other processes share the CPU, so the timings "
            "(tok/s, speedup) are unreliable; the accepted lengths, experts and quality columns are not affected")


# --- the runs -------------------------------------------------------------------------------------

def plain_decoding(target, prompts, new_tokens: int) -> float:
    """tokens/s of transformers' own greedy generate over the prompts (the autoregressive baseline)."""
    count, t0 = 0, time.perf_counter()
    for prompt in prompts:
        out = target.generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long,
                              device=prompt.device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
        count += out.shape[1] - prompt.numel()
    return count / (time.perf_counter() - t0)


def speculative_row(name, budget, decoder, prompts, new_tokens, repeats, exact_outs=None) -> tuple[DemoRow, list]:
    """Speed over `repeats` runs of all prompts; accepted length, experts and agreement from the first."""
    from ..quality import greedy_agreement, speculative_run

    row, outs = DemoRow(name, budget), None
    for _ in range(repeats):
        got, summary = speculative_run(decoder, prompts, budget, new_tokens)
        row.tokens_per_s.append(summary["tokens_per_s"])
        if outs is None:
            outs = got
            row.mean_accepted = summary["mean_accepted"]
            row.verify_experts_per_layer = summary["verify_experts_per_layer"]
            row.budget_bound = summary["budget_bound"]
    row.agreement = greedy_agreement(exact_outs if exact_outs is not None else outs, outs)
    return row, outs


def add_heldout(row: DemoRow, target, heldout, budget, policy, windows, scorer, exact_preds) -> torch.Tensor:
    from ..quality import score_windows

    scores = score_windows(target, heldout, 32, budget, policy, windows, compiled=scorer)
    row.heldout_loss, row.heldout_accuracy = scores.loss, scores.accuracy
    ref = exact_preds if exact_preds is not None else scores.predictions
    row.heldout_agreement = (scores.predictions == ref).float().mean().item()
    return scores.predictions


def auto_decoder(target, drafter, policy, options):
    """The controller's row (tree="auto", budget="auto"), or (None, why) where the decoder does not take it."""
    from ..speculative import SpeculativeDecoder

    try:
        return SpeculativeDecoder(target, drafter=drafter, tree="auto", budget="auto", policy=policy, compile=True,
                                  compile_options=options), None
    except (ValueError, TypeError, NotImplementedError) as exc:
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# --- the plot -------------------------------------------------------------------------------------

def plot(rows: list[DemoRow], path: Path, num_experts: int, unreliable: bool = False) -> None:
    """Left: speedup over plain decoding with its range; right: quality; both against experts loaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted([r for r in rows if r.verify_experts_per_layer is not None], key=lambda r: r.verify_experts_per_layer)
    xs = [r.verify_experts_per_layer for r in rows]
    fig, (speed, quality) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    timed = [(x, r) for x, r in zip(xs, rows) if r.speedup is not None]
    if timed:
        mid = [r.speedup[0] for _, r in timed]
        err = [[m - r.speedup[1] for m, (_, r) in zip(mid, timed)], [r.speedup[2] - m for m, (_, r) in zip(mid, timed)]]
        speed.errorbar([x for x, _ in timed], mid, yerr=err, fmt="o-", capsize=3, label="speculative, median [range]")
        for (x, r), m in zip(timed, mid):
            speed.annotate(r.name, (x, m), textcoords="offset points", xytext=(-8, 7), fontsize=8)
    speed.axhline(1.0, color="grey", linestyle="--", label="plain decoding (transformers greedy)")
    speed.set_xlabel(f"experts loaded per layer per verify pass (of {num_experts})")
    speed.set_ylabel("speedup over plain decoding")
    speed.grid(alpha=0.3)
    speed.legend(fontsize=8)
    speed.set_title("speed (machine loaded: timings unreliable)" if unreliable else "speed")
    quality.plot(xs, [r.heldout_accuracy for r in rows], "o-", label="held-out next-token accuracy")
    quality.plot(xs, [r.heldout_agreement for r in rows], "^-", label="held-out argmax equal to the exact pass's")
    quality.plot(xs, [r.agreement for r in rows], "s-", label="greedy output equal to the exact one, by position")
    quality.set_xlabel(f"experts loaded per layer per verify pass (of {num_experts})")
    quality.set_ylabel("fraction")
    quality.set_ylim(0, 1.12)
    quality.grid(alpha=0.3)
    quality.legend(fontsize=7, loc="best")
    quality.set_title("quality")
    fig.suptitle("moespec tiny MoE: expert budget against speed and quality")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --- the command ----------------------------------------------------------------------------------

def _parser():
    p = new_parser("moespec demo", __doc__)
    p.add_argument("--budgets", type=budgets_arg, default=None,
                   help="comma-separated budgets C, experts per layer per verify pass (default: E/16, E/8, E/4 and "
                   "E/2 of the target's E experts)")
    p.add_argument("--policy", default="substitute", choices=("substitute", "truncate"))
    p.add_argument("--prompts", type=positive_int, default=2, help="held-out prompts per run")
    p.add_argument("--prompt-len", type=positive_int, default=48, help="tokens per prompt")
    p.add_argument("--new-tokens", type=positive_int, default=48, help="tokens generated per prompt")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per row (the ranges are over these)")
    p.add_argument("--windows", type=positive_int, default=32, help="held-out 32-token passes scored per row")
    p.add_argument("--out", default="moespec_demo", help="folder for the plot and the JSON rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="a small, fast run (CI): budgets E/8 and E/4, 1 prompt, "
                   "12 tokens, 2 repeats, 4 windows, eager")
    return p


def _say(line: str = "") -> None:
    print(line, flush=True)


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    import moe_spec_compile as msc

    p = _parser()
    args = p.parse_args(argv)
    check_device(p, args.device)
    if args.quick:
        args.prompts, args.new_tokens, args.windows, args.repeats = 1, 12, 4, 2
    warning = load_warning()
    if warning:
        _say(warning)
    torch.manual_seed(0)
    with quiet_loading():
        target, draft, tok = msc.load_tiny(device=args.device)
    prompts, heldout = prompts_and_heldout(tok, args.prompts, args.prompt_len)
    prompts = [x.to(args.device) for x in prompts]
    e = target.config.num_experts
    if args.budgets is None:
        fractions = (8, 4) if args.quick else (16, 8, 4, 2)
        args.budgets = sorted({max(1, e // f) for f in fractions})
    _say(f"moespec demo: bundled Qwen3-MoE target ({target.config.num_hidden_layers} layers, {e} experts, "
         f"top-{target.config.num_experts_per_tok}), dense draft, {args.prompts} held-out prompts, "
         f"{args.new_tokens} new tokens each, {args.repeats} timed repeats per row\n")
    _say(msc.explain(target, prompts[0][None], use_cache=False).table() + "\n")

    from ..quality import _compiled, speculative_run
    from ..speculative import SpeculativeDecoder

    options = {"inner": "eager"} if args.quick or args.device == "cpu" else {}
    drafter = msc.ModelDrafter(draft)
    decoder = SpeculativeDecoder(target, drafter=drafter, tree=msc.TreeSpec(*TREE), policy=args.policy,
                                 compile=True, compile_options=options)
    scorer = _compiled(target, options)
    budgets = [None] + list(args.budgets)
    # Untimed: compiles the verify pass (one graph per tree-size bucket; budgets are data, no recompiles) and
    # warms the caches, once exact and once under a budget, then transformers' own generate.
    warm = budgets[:2]
    print("warm-up: compiling the verify passes, untimed ...", file=sys.stderr, flush=True)
    steps = tqdm(total=len(warm) + 1, desc="warm-up", leave=False, file=sys.stderr, disable=None)  # a terminal only
    for c in warm:
        speculative_run(decoder, prompts[:1], c, args.new_tokens)
        steps.update()
    plain_decoding(target, prompts[:1], 2)
    steps.update()
    steps.close()

    _say(HEAD)
    _say("-" * len(HEAD))
    base = DemoRow("plain", None, [plain_decoding(target, prompts, args.new_tokens) for _ in range(args.repeats)])
    _say(format_row(base))
    rows, exact_outs, exact_preds = [], None, None
    for c in budgets:
        row, outs = speculative_row("exact" if c is None else f"C={c}", c, decoder, prompts, args.new_tokens,
                                    args.repeats, exact_outs)
        row.speedup = speedup(row.tokens_per_s, base.tokens_per_s)
        preds = add_heldout(row, target, heldout, c, args.policy, args.windows, scorer, exact_preds)
        if c is None:
            exact_outs, exact_preds = outs, preds
        rows.append(row)
        _say(format_row(row))

    # --- the controller's row: tree="auto", budget="auto" (added by the cost-model work) -----------------
    auto, why = auto_decoder(target, drafter, args.policy, options)
    if auto is None:
        _say(f"  auto: skipped, the decoder does not take tree/budget 'auto' yet ({why})")
    else:
        # warm-up on every prompt: the controller's tests meet several pass sizes, each compiled on first use
        speculative_run(auto, prompts, "auto", args.new_tokens)
        row, _ = speculative_row("auto", "auto", auto, prompts, args.new_tokens, args.repeats, exact_outs)
        row.speedup = speedup(row.tokens_per_s, base.tokens_per_s)
        rows.append(row)
        _say(format_row(row))

    _say("\n" + verdict(rows))
    _say("\n" + COLUMNS.format(e=e))
    warning = load_warning() or warning
    if warning:
        _say("\n" + warning)
    out = Path(args.out)
    plot(rows, out / "speed_and_quality.png", e, unreliable=warning is not None)
    budget_rows = [r.as_dict() for r in rows if r.budget != "auto"]
    (out / "rows.json").write_text(json.dumps(budget_rows, indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps({"baseline": base.as_dict(), "rows": [r.as_dict() for r in rows],
                                                  "tree": TREE, "args": vars(args), "load_warning": warning},
                                                 indent=2, default=str) + "\n")
    _say(f"\nwrote {out / 'speed_and_quality.png'}, {out / 'rows.json'} and {out / 'summary.json'}")
    return 0

