"""`make demo` / `moespec demo`: the bundled tiny MoE under a range of expert budgets. Did speculation get faster
than plain decoding, and what did the budget cost?

arguments (checked first) -> load_tiny() -> explain table -> the rows: two baselines that do not speculate
(transformers' greedy generate, and moespec's own plain decoding, tree=0, through the same compiled target), then
speculative decoding without a budget, with each budget C, the shipped EAGLE-3 head (a chain of 4) and the
controller (auto) -> each row run once untimed
(compiles), then `repeats` rounds in which every row runs once, in turn (load drifts hit every row alike) -> the
table (tokens/s, speedup over both baselines, accepted length, experts per layer per verify, agreement with the
exact output, held-out quality under C) and the verdict, judged against tree=0 -> a PNG with speed beside
quality, and the rows as JSON

    moespec demo                    # budgets E/16, E/8, E/4, E/2 beside the exact run, tree=0 and generate
    moespec demo --quick --budgets 4,8,16
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..tiny import HERE, prompts_and_heldout
from .args import budgets_arg, check_device, new_parser, positive_int, quiet_loading

TREE = (16, 4, 4)  # TreeSpec(total_tokens, depth, top_k) of every speculative row

BASELINES = ("generate", "tree=0")  # the rows that do not speculate, in table order

COLUMNS = """\
rows:
  generate      transformers' greedy generate on the eager model
  tree=0        moespec's own plain decoding: one token per step through the same compiled target, no draft
  exact, C=..   speculative decoding ({tree}-node tree, the bundled draft) without a budget, under budget C
  auto          the controller's choice of tree and budget (tree="auto", budget="auto")
  eagle3        speculative decoding with the bundled target's EAGLE-3 head (a chain of 4, no budget)
  offload       the exact {tree}-node tree on a copy of the target whose experts are offloaded, a quarter of
                them resident per layer (msc.offload_experts, host store, LFU): missing experts load as needed;
                timed in rounds of its own after the other rows
columns:
  tok/s         new tokens per second over all prompts: median of the repeats [min-max]; the repeats are
                interleaved rounds, each running every row once, in turn
  x generate    tok/s over transformers' generate (median over median) [slowest over fastest baseline -
                fastest over slowest]
  x tree=0      tok/s over tree=0's, the same way; the verdict reads this column: speculation paid off only
                where a row beats tree=0 in every repeat
  accepted      tokens each verify pass emitted: accepted drafted tokens + the bonus token
  experts       distinct experts per MoE layer per verify pass, mean (the budget caps it; of {e})
  bound         share of verify passes in which some layer used all C experts it was allowed
  agree         new tokens equal to the exact speculative output (= the target's greedy output), by position
  same argmax   held-out positions whose argmax under C equals the exact pass's (teacher-forced form of agree)
  held-out acc  next-token accuracy on held-out text, each 32-token window scored as one pass under C
  held-out loss mean next-token cross-entropy (nats) on the same windows"""


@dataclass
class DemoRow:
    name: str  # "generate", "tree=0", "exact", "C=8", "auto"
    budget: int | str | None
    tokens_per_s: list[float] = field(default_factory=list)  # one per repeat
    speedup_generate: tuple[float, float, float] | None = None  # (median, low, high) against transformers' generate
    speedup_tree0: tuple[float, float, float] | None = None  # the same against moespec's plain decoding (tree=0)
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

HEAD = (f"{'row':>8} {'tok/s':>19} {'x generate':>18} {'x tree=0':>18} {'accepted':>8} {'experts':>7} {'bound':>5} "
        f"{'agree':>6} {'same argmax':>11} {'held-out acc':>12} {'held-out loss':>13}")


def _fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def _ratio(up: tuple[float, float, float] | None) -> str:
    return "-" if up is None else f"{up[0]:.2f}x [{up[1]:.2f}-{up[2]:.2f}]"


def format_row(r: DemoRow) -> str:
    tps = r.tokens_per_s
    speed = f"{statistics.median(tps):6.1f} [{min(tps):.1f}-{max(tps):.1f}]" if tps else "-"
    return (f"{r.name:>8} {speed:>19} {_ratio(r.speedup_generate):>18} {_ratio(r.speedup_tree0):>18} "
            f"{_fmt(r.mean_accepted, '.2f', 8)} "
            f"{_fmt(r.verify_experts_per_layer, '.1f', 7)} {_fmt(r.budget_bound, '.0%', 5)} "
            f"{_fmt(r.agreement, '.0%', 6)} {_fmt(r.heldout_agreement, '.1%', 11)} "
            f"{_fmt(r.heldout_accuracy, '.1%', 12)} {_fmt(r.heldout_loss, '.3f', 13)}")


def speedup(tps: list[float], base: list[float]) -> tuple[float, float, float]:
    """(median ratio, worst case, best case) of tokens/s against the baseline's repeats."""
    return statistics.median(tps) / statistics.median(base), min(tps) / max(base), max(tps) / min(base)


def add_speedups(rows: list[DemoRow]) -> None:
    """Every row's tokens/s against both baselines' (the rows named "generate" and "tree=0")."""
    base = {r.name: r.tokens_per_s for r in rows if r.name in BASELINES and r.tokens_per_s}
    for r in rows:
        if r.tokens_per_s:
            r.speedup_generate = speedup(r.tokens_per_s, base["generate"]) if "generate" in base else None
            r.speedup_tree0 = speedup(r.tokens_per_s, base["tree=0"]) if "tree=0" in base else None


def verdict(rows: list[DemoRow]) -> str:
    """One line answering "did speculation pay?": the fastest speculative row against moespec's own plain decoding
    (tree=0, the fastest decoding here without speculation), with its ratio to transformers' generate beside it.
    Beating generate alone is no win: tree=0 is the baseline speculation has to beat."""
    timed = [r for r in rows if r.name not in BASELINES and r.speedup_tree0 is not None]
    if not timed:
        return "no speculative row timed against tree=0"
    best = max(timed, key=lambda r: r.speedup_tree0[0])
    median, low, high = best.speedup_tree0
    if low > 1:
        words = "speculation paid off: faster than tree=0 in every repeat"
    elif high < 1:
        words = "speculation did not pay: slower than tree=0 in every repeat (see the README: where speculation pays)"
    else:
        words = "speculation did not pay here: within the noise of tree=0"
    generate = "" if best.speedup_generate is None else f", {best.speedup_generate[0]:.2f}x transformers' generate"
    return (f"fastest speculative row: {best.name}, {median:.2f}x tree=0's tokens/s [{low:.2f}-{high:.2f}]{generate}: "
            f"{words}")


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

def transformers_generate(target, prompts, new_tokens: int) -> float:
    """tokens/s of transformers' own greedy generate over the prompts (one of the two baselines)."""
    count, t0 = 0, time.perf_counter()
    for prompt in prompts:
        out = target.generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long,
                              device=prompt.device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
        count += out.shape[1] - prompt.numel()
    return count / (time.perf_counter() - t0)


def run_interleaved(runs: list[tuple[DemoRow, Callable[[], tuple[list | None, dict]]]], repeats: int,
                    tick: Callable[[], object] = lambda: None) -> dict[str, list | None]:
    """Each run once, untimed (a decoder's first requests compile the pass sizes they meet), then `repeats` rounds
    in which every row runs once, in turn: load drifts hit every row alike. A run returns (new tokens per prompt
    or None, summary with tokens_per_s); tokens/s of every round go to the row, accepted length, experts and bound
    of the first round. Returns each row's new tokens of the first round."""
    for _, run in runs:
        run()
        tick()
    outs: dict[str, list | None] = {}
    for _ in range(repeats):
        for row, run in runs:
            got, summary = run()
            row.tokens_per_s.append(summary["tokens_per_s"])
            if row.name not in outs:
                outs[row.name] = got
                row.mean_accepted = summary.get("mean_accepted")
                # 0: no verify pass was counted (exact passes on the plain path are not), not a pass of no experts
                row.verify_experts_per_layer = summary.get("verify_experts_per_layer") or None
                row.budget_bound = summary.get("budget_bound")
            tick()
    return outs


def add_heldout(row: DemoRow, target, heldout, budget, policy, windows, scorer, exact_preds) -> torch.Tensor:
    from ..quality import score_windows

    scores = score_windows(target, heldout, 32, budget, policy, windows, compiled=scorer)
    row.heldout_loss, row.heldout_accuracy = scores.loss, scores.accuracy
    ref = exact_preds if exact_preds is not None else scores.predictions
    row.heldout_agreement = (scores.predictions == ref).float().mean().item()
    return scores.predictions


def warm_configs(decoder, prompts: list[torch.Tensor], new_tokens: int) -> None:
    """Decode every prompt once under every (tree, budget) the controller of `decoder` may choose, untimed: each
    pass shape (tree size, cache size) compiles and settles its exact path, and each drafting shape compiles, here
    rather than inside a timed round the first time the controller picks it (through inductor, seconds each). The
    controller's own requests come first: they size the caches for its largest shape, which the static decodes then
    share (a cache only grows; graphs compiled at a smaller one would compile again at the controller's size)."""
    for prompt in prompts:
        decoder.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None)
    for shape, c in decoder.controller.configs:
        for prompt in prompts:
            decoder.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None, tree=shape, budget=c)


def auto_decoder(target, drafter, policy, options):
    """The controller's row (tree="auto", budget="auto"), or (None, why) where the decoder does not take it."""
    from ..speculative import SpeculativeDecoder

    try:
        return SpeculativeDecoder(target, drafter=drafter, tree="auto", budget="auto", policy=policy, compile=True,
                                  compile_options=options), None
    except (ValueError, TypeError, NotImplementedError) as exc:
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# --- the plot -------------------------------------------------------------------------------------

POINTS = {"exact": ("s", "exact (no budget)"), "auto": ("D", "auto (the controller)"),
          "tree=0": ("^", "tree=0 (moespec plain decoding)"),
          "eagle3": ("*", "EAGLE-3 head, chain of 4"),
          "offload": ("P", "experts offloaded, E/4 resident")}  # rows drawn as labelled points, not on the curve


def _experts(row: DemoRow, top_k: int) -> float | None:
    """x of a row: experts per layer per verify pass; a tree=0 step without a counted pass loads exactly top-k."""
    if row.verify_experts_per_layer is not None:
        return row.verify_experts_per_layer
    return float(top_k) if row.name == "tree=0" else None


def _bars(ax, pts: list[tuple[float, DemoRow]], fmt: str, label: str, beside: bool = False) -> None:
    """Median speedup over tree=0 with its [low, high] range at each (x, row), each point labelled by its row:
    above it, or to its right (beside)."""
    mid, low, high = zip(*(r.speedup_tree0 for _, r in pts))
    err = [[m - lo for m, lo in zip(mid, low)], [hi - m for m, hi in zip(mid, high)]]
    ax.errorbar([x for x, _ in pts], mid, yerr=err, fmt=fmt, capsize=3, label=label)
    for (x, r), m in zip(pts, mid):
        ax.annotate(r.name, (x, m), textcoords="offset points", xytext=(7, -3) if beside else (-8, 7), fontsize=8,
                    ha="left")


def figure(rows: list[DemoRow], num_experts: int, top_k: int, unreliable: bool = False):
    """Left: speedup over tree=0 with its range against experts loaded per layer per verify pass: the budget sweep
    as one curve, exact, auto and tree=0 as labelled points, transformers' generate as a level; right: quality of
    the budget sweep, exact's as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placed = [(_experts(r, top_k), r) for r in rows]
    sweep = sorted([(x, r) for x, r in placed if x is not None and isinstance(r.budget, int)], key=lambda p: p[0])
    points = [(x, r) for x, r in placed if x is not None and r.name in POINTS]
    fig, (speed, quality) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    timed = [(x, r) for x, r in sweep if r.speedup_tree0 is not None]
    if timed:
        _bars(speed, timed, "o-", "budget C, median [range]")
    for x, r in points:
        if r.speedup_tree0 is not None:
            _bars(speed, [(x, r)], POINTS[r.name][0], POINTS[r.name][1], beside=True)  # the curve's sit above
    speed.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    generate = next((r for r in rows if r.name == "generate" and r.speedup_tree0 is not None), None)
    if generate is not None:
        speed.axhline(generate.speedup_tree0[0], color="black", linestyle=":", label="transformers greedy generate")
    speed.set_xlabel(f"experts loaded per layer per verify pass (of {num_experts})")
    speed.set_ylabel("speedup over tree=0 (moespec plain decoding)")
    speed.grid(alpha=0.3)
    speed.legend(fontsize=7)
    speed.set_title("speed (machine loaded: timings unreliable)" if unreliable else "speed")
    series = [("heldout_accuracy", "o", "held-out next-token accuracy"),
              ("heldout_agreement", "^", "held-out argmax equal to the exact pass's"),
              ("agreement", "s", "greedy output equal to the exact one, by position")]
    for attr, marker, label in series:
        line, = quality.plot([x for x, _ in sweep], [getattr(r, attr) for _, r in sweep], f"{marker}-", label=label)
        exact = [(x, getattr(r, attr)) for x, r in points if r.name == "exact" and getattr(r, attr) is not None]
        if exact:
            quality.plot(*zip(*exact), marker, color=line.get_color(), markerfacecolor="none", markersize=9)
    for x, r in sweep + [(x, r) for x, r in points if r.name == "exact"]:
        quality.annotate(r.name, (x, 1.02 if isinstance(r.budget, int) else 1.07), ha="center", fontsize=7)
    quality.set_xlabel(f"experts loaded per layer per verify pass (of {num_experts}); hollow: exact")
    quality.set_ylabel("fraction")
    quality.set_ylim(0, 1.12)
    quality.grid(alpha=0.3)
    quality.legend(fontsize=7, loc="lower right")
    quality.set_title("quality")
    fig.suptitle("moespec tiny MoE: expert budget against speed and quality")
    fig.tight_layout()
    return fig


def plot(rows: list[DemoRow], path: Path, num_experts: int, top_k: int, unreliable: bool = False) -> None:
    fig = figure(rows, num_experts, top_k, unreliable)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    import matplotlib.pyplot as plt  # after figure() chose the Agg backend

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


def offloaded_decoder(target, draft, policy, options):
    """(decoder, offload handle): the demo's exact tree on a copy of the target with a quarter of each layer's
    experts resident (the copy keeps the other rows' target untouched)."""
    import copy

    from ..offload import offload_experts
    from ..speculative import ModelDrafter, SpeculativeDecoder, TreeSpec

    twin = copy.deepcopy(target)
    handle = offload_experts(twin, resident=0.25)
    dec = SpeculativeDecoder(twin, drafter=ModelDrafter(draft), tree=TreeSpec(*TREE), policy=policy,
                             compile=True, compile_options=options)
    return dec, handle


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

    from ..quality import _compiled, greedy_agreement, speculative_run
    from ..speculative import SpeculativeDecoder

    options = {"inner": "eager"} if args.quick else {}  # inductor on every device: tree=0 is the fastest plain decoding
    drafter = msc.ModelDrafter(draft)
    decoder = SpeculativeDecoder(target, drafter=drafter, tree=msc.TreeSpec(*TREE), policy=args.policy,
                                 compile=True, compile_options=options)
    # moespec's own plain decoding, built like the speculative rows (same compile options): the baseline to beat
    tree0 = SpeculativeDecoder(target, tree=0, policy=args.policy, compile=True, compile_options=options)
    scorer = _compiled(target, options)  # held-out windows, one pass each under C
    budgets = [None] + list(args.budgets)

    def spec(dec, budget):
        return lambda: speculative_run(dec, prompts, budget, args.new_tokens)

    def generate():
        return None, {"tokens_per_s": transformers_generate(target, prompts, args.new_tokens)}

    runs = [(DemoRow("generate", None), generate), (DemoRow("tree=0", None), spec(tree0, None))]
    runs += [(DemoRow("exact" if c is None else f"C={c}", c), spec(decoder, c)) for c in budgets]
    if (HERE / "eagle3" / "model.safetensors").exists():  # the drafter most MoE users run: an EAGLE-3 head
        eagle = SpeculativeDecoder(target, drafter=msc.Eagle3Drafter.from_pretrained(HERE / "eagle3", target), tree=4,
                                   policy=args.policy, compile=True, compile_options=options)
        runs.append((DemoRow("eagle3", None), spec(eagle, None)))
    auto, why = auto_decoder(target, drafter, args.policy, options)  # tree="auto", budget="auto"
    if auto is None:
        _say(f"auto: skipped, the decoder does not take tree/budget 'auto' yet ({why})\n")
    else:
        warm_configs(auto, prompts, args.new_tokens)
        runs.append((DemoRow("auto", "auto"), spec(auto, "auto")))
    print(f"timing {len(runs)} rows: each once untimed (compiles the verify passes), then {args.repeats} rounds of "
          "every row in turn ...", file=sys.stderr, flush=True)
    steps = tqdm(total=len(runs) * (args.repeats + 1), desc="runs", leave=False, file=sys.stderr,
                 disable=None)  # a terminal only
    outs = run_interleaved(runs, args.repeats, steps.update)
    steps.close()
    # The offload row in rounds of its own, after the others: while experts are offloaded, the decoder's compiles keep
    # dynamo's module guards (speculative.buckets._guards), which would slow every other row's passes too.
    off_dec, off_handle = offloaded_decoder(target, draft, args.policy, options)  # a quarter of the experts resident
    off_row = DemoRow("offload", None)
    outs.update(run_interleaved([(off_row, spec(off_dec, None))], args.repeats))
    stats = off_handle.stats().values()
    off_handle.restore()
    runs.append((off_row, None))
    rows = [row for row, _ in runs]
    add_speedups(rows)
    exact_preds = None
    for row in rows:  # untimed: agreement with the exact output, and held-out quality of the budget sweep
        if outs[row.name] is not None:
            row.agreement = greedy_agreement(outs["exact"], outs[row.name])
        if row.name == "exact" or isinstance(row.budget, int):  # exact comes first: same argmax's reference
            preds = add_heldout(row, target, heldout, row.budget, args.policy, args.windows, scorer, exact_preds)
            exact_preds = preds if row.name == "exact" else exact_preds

    _say(HEAD)
    _say("-" * len(HEAD))
    for row in rows:
        _say(format_row(row))
    hits, misses = sum(b["hits"] for b in stats), sum(b["misses"] for b in stats)
    _say(f"\noffload: {next(iter(stats))['slots']} of {e} experts resident per layer; over every run of the row "
         f"{hits} hits and {misses} misses (hit rate {hits / max(hits + misses, 1):.3f}), "
         f"{sum(b['loaded_bytes'] for b in stats) / 1e6:.1f} MB loaded")
    _say("\n" + verdict(rows))
    _say("\n" + COLUMNS.format(e=e, tree=TREE[0]))
    warning = load_warning() or warning
    if warning:
        _say("\n" + warning)
    out = Path(args.out)
    plot(rows, out / "speed_and_quality.png", e, target.config.num_experts_per_tok, unreliable=warning is not None)
    sweep = [r.as_dict() for r in rows if r.name == "exact" or isinstance(r.budget, int)]
    (out / "rows.json").write_text(json.dumps(sweep, indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps({"rows": [r.as_dict() for r in rows], "verdict": verdict(rows),
                                                  "tree": TREE, "args": vars(args), "load_warning": warning},
                                                 indent=2, default=str) + "\n")
    _say(f"\nwrote {out / 'speed_and_quality.png'}, {out / 'rows.json'} and {out / 'summary.json'}")
    return 0
