"""Write MODEL_CARD.md for the bundled models from train_stats.json and measurements made here.

train_stats.json + load_tiny() -> routing on held-out 32-token passes, speculative decoding with the draft and
with the EAGLE-3 head (eagle3/, its own train_stats.json) -> eval_stats.json -> MODEL_CARD.md (every figure in the
card comes from these files)

    python -m moe_spec_compile.tiny.card
    python -m moe_spec_compile.tiny.card --eagle-only   # measure the EAGLE-3 head's figures, keep the rest
"""

from __future__ import annotations

import json
import math
import time

import torch

from . import HERE, heldout_text, load_tiny

COLD = 0.01  # an expert taking less than 1% of a layer's top-k slots counts as cold


@torch.no_grad()
def routing_stats(target, ids: torch.Tensor, window: int = 32, max_windows: int = 48) -> dict:
    """Per layer: expert load (share of the top-k slots) over the held-out slice; per 32-token pass: the
    experts holding 90% of the summed router probability mass s_e, and the share the top half holds."""
    cfg = target.config
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    n = min(max_windows, (ids.numel() - 1) // window)
    load = torch.zeros(cfg.num_hidden_layers, e)
    for90, top_half = [], []
    for w in range(n):
        x = ids[w * window : (w + 1) * window][None]
        out = target(x, use_cache=False, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
            load[layer] += torch.bincount(probs.topk(k).indices.reshape(-1), minlength=e).float()
            mass = probs.sum(0).sort(descending=True).values  # s_e, largest first
            cum = mass.cumsum(0) / mass.sum()
            for90.append(int((cum < 0.9).sum()) + 1)
            top_half.append(float(cum[e // 2 - 1]))
    load = load / load.sum(1, keepdim=True)
    return {
        "windows": n, "window": window, "experts": e, "top_k": k,
        "experts_for_90pct_mass_mean": sum(for90) / len(for90),
        "experts_for_90pct_mass_min_max": [min(for90), max(for90)],
        "experts_for_90pct_mass_if_uniform": math.ceil(0.9 * e),
        "top_half_mass_share_mean": sum(top_half) / len(top_half),
        "top_half_mass_share_min": min(top_half),
        "expert_load_max_share_per_layer": [round(float(v), 4) for v in load.max(1).values],
        "cold_experts_per_layer": [int((row < COLD).sum()) for row in load],
        "unused_experts_per_layer": [int((row == 0).sum()) for row in load],
        "expert_load_per_layer": [[round(float(v), 4) for v in row] for row in load],
    }


def speculative_stats(target, draft, ids: torch.Tensor, prompts: int = 4, prompt_len: int = 48,
                      new_tokens: int = 48) -> dict | None:
    """Mean accepted length (tokens per verify pass, bonus included) of exact greedy speculative decoding
    with the draft, on held-out prompts; None when the speculative package is not available."""
    try:
        from ..quality import speculative_run
        from ..speculative import ModelDrafter, SpeculativeDecoder, TreeSpec
    except ImportError:
        return None
    stride = ids.numel() // prompts
    starts = [i * stride for i in range(prompts)]
    res = {"prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens}
    for name, tree in (("chain4", 4), ("tree16", TreeSpec(total_tokens=16, depth=4, top_k=4))):
        dec = SpeculativeDecoder(target, drafter=ModelDrafter(draft), tree=tree)
        _, summary = speculative_run(dec, [ids[s : s + prompt_len] for s in starts], None, new_tokens)
        res[f"mean_accepted_{name}"] = summary["mean_accepted"]
    return res


@torch.no_grad()
def eagle3_stats(target, draft, ids: torch.Tensor, prompts: int = 4, prompt_len: int = 48, new_tokens: int = 48,
                 rounds: int = 3) -> dict | None:
    """The shipped EAGLE-3 head (eagle3/): mean accepted length per shape of exact greedy speculative decoding on
    the held-out prompts speculative_stats uses, and its drafting cost per drafted token next to the dense draft's
    and to the target's decode step (chain of 4, uncompiled, the decoder's own timers; medians over rounds);
    None when no head ships."""
    from ..eagle3 import Eagle3Drafter
    from ..quality import speculative_run
    from ..speculative import ModelDrafter, SpeculativeDecoder, TreeSpec

    if not (HERE / "eagle3" / "model.safetensors").exists():
        return None
    stride = ids.numel() // prompts
    batch = [ids[i * stride : i * stride + prompt_len] for i in range(prompts)]
    eagle = Eagle3Drafter.from_pretrained(HERE / "eagle3", target)
    res = {"prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens}
    for name, tree in (("chain4", 4), ("tree16", TreeSpec(total_tokens=16, depth=4, top_k=4))):
        _, summary = speculative_run(SpeculativeDecoder(target, drafter=eagle, tree=tree), batch, None, new_tokens)
        res[f"mean_accepted_{name}"] = summary["mean_accepted"]
    per = {"eagle3": [], "dense": [], "target": []}
    decs = {"eagle3": SpeculativeDecoder(target, drafter=eagle, tree=4),
            "dense": SpeculativeDecoder(target, drafter=ModelDrafter(draft), tree=4),
            "target": SpeculativeDecoder(target, tree=0)}
    for r in range(rounds + 1):  # the first round warms up
        for name, dec in decs.items():
            st = [dec.generate(p[None], max_new_tokens=new_tokens, eos_token_id=None).stats for p in batch]
            if r:
                steps = sum(s.steps for s in st)
                per[name].append(sum(s.time_verify for s in st) / steps if name == "target"
                                 else sum(s.time_draft for s in st) / (4 * steps))
    med = {name: sorted(v)[len(v) // 2] * 1e3 for name, v in per.items()}
    res.update(draft_ms_per_drafted_token=round(med["eagle3"], 3), dense_ms_per_drafted_token=round(med["dense"], 3),
               target_step_ms=round(med["target"], 3), eagle3_over_target=round(med["eagle3"] / med["target"], 3),
               dense_over_target=round(med["dense"] / med["target"], 3), threads=torch.get_num_threads(),
               load_average_1min=round(__import__("os").getloadavg()[0], 2))
    return res


@torch.no_grad()
def cost_stats(target, draft, ids: torch.Tensor, prompt_len: int = 48, steps: int = 32, rounds: int = 5) -> dict:
    """Per-token cost on this CPU: one decode step (1 new token after a prompt of prompt_len, KV cache), target
    and draft timed in alternating rounds so that load hits both alike; medians over rounds of `steps` steps.
    One thread: on cores shared with other work, several OpenMP threads spinning at barriers made both models
    10-50x slower and the ratio meaningless."""
    from transformers import DynamicCache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _cost_stats(target, draft, ids, prompt_len, steps, rounds, DynamicCache)
    finally:
        torch.set_num_threads(threads)


def _cost_stats(target, draft, ids, prompt_len, steps, rounds, DynamicCache) -> dict:
    from ..speculative.kv import cache_keyword

    def step_time(model) -> float:
        cache = {cache_keyword(model): DynamicCache(config=model.config)}
        out = model(ids[None, :prompt_len], use_cache=True, **cache)
        tok = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(tok, use_cache=True, **cache)
            tok = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t0) / steps

    step_time(target), step_time(draft)  # warm-up
    times = {"target": [], "draft": []}
    for _ in range(rounds):
        for name, model in (("target", target), ("draft", draft)):
            times[name].append(step_time(model))
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    return {"target_step_ms": round(med["target"] * 1e3, 3), "draft_step_ms": round(med["draft"] * 1e3, 3),
            "draft_over_target": round(med["draft"] / med["target"], 3), "threads": torch.get_num_threads(),
            "steps": steps, "rounds": rounds, "prompt_len": prompt_len,
            "load_average_1min": round(__import__("os").getloadavg()[0], 2)}


def _rerun_line(r: dict | None) -> str:
    """The card's line on a rerun of the head's training with nothing else on the cores, when one is recorded."""
    if not r:
        return ""
    agree = " / ".join(f"{a:.4f}" for a in r["heldout_top1_agreement_per_step"])
    return (f"\n  The same command rerun on idle cores: {r['total_seconds']:.0f} s in all "
            f"({r['seconds_per_step']} s per step),\n  held-out agreement {agree} (not bitwise the shipped weights: "
            "thread scheduling).")


def _eagle_lines(e: dict | None, t: dict | None) -> str:
    """The card's EAGLE-3 section from eval_stats.json's "eagle3" and eagle3/train_stats.json."""
    if e is None or t is None:
        return ""
    agree = " / ".join(f"{a:.3f}" for a in t["heldout_top1_agreement_per_step"])
    ids = tuple(t["config"]["aux_layer_ids"])
    return f"""
## EAGLE-3 head (`eagle3/`, EAGLE / SpecForge format: config.json + model.safetensors)
    python -m moe_spec_compile.tiny.train_eagle --out moe_spec_compile/tiny/eagle3
- One decoder layer (hidden {t['config']['hidden_size']}) over the target's hidden_states {ids} (the inputs of those
  layers), draft vocabulary {t['draft_vocab']} of {t['config']['vocab_size']} (covering
  {t['draft_vocab_train_token_coverage']:.1%} of the train tokens), {t['params']:,} parameters, fp16
  {t['file_bytes'] / 1e6:.1f} MB; {t['steps']} steps of training-time test unrolled over {t['ttt_steps']} steps,
  weights {t['step_weight']}^k, against the target's distribution on the draft vocabulary;
  {t['train_seconds']:.0f} s on {t['cpu_threads']} threads; seed {t['seed']}.{_rerun_line(t.get('rerun_idle'))}
- Held-out top-1 agreement with the target per drafting depth (teacher-forced, {t['heldout_windows']} windows):
  {agree}; the dense draft {t['dense_draft_target_top1_agreement']:.3f}.
- Exact greedy speculative decoding with the head ({e['prompts']} held-out prompts of {e['prompt_len']} tokens,
  {e['new_tokens']} new tokens): mean accepted length {e['mean_accepted_chain4']:.2f} with a chain of 4,
  {e['mean_accepted_tree16']:.2f} with a 16-token tree (depth 4, top-4), features from the verify passes.
- Drafting cost per drafted token (chain of 4, uncompiled, {e['threads']} threads, 1-minute load average
  {e['load_average_1min']}): head {e['draft_ms_per_drafted_token']:.2f} ms ({e['eagle3_over_target']:.2f} of the
  target's decode step of {e['target_step_ms']:.2f} ms), dense draft {e['dense_ms_per_drafted_token']:.2f} ms
  ({e['dense_over_target']:.2f}).
"""


def _card(s: dict, r: dict, spec: dict | None, tcfg, dcfg, sizes: dict, cost: dict | None = None,
          eagle: str = "") -> str:
    load = s.get("load_average_1min_start_end")
    busy = f"; 1-minute load average {load[0]} at the start, {load[1]} at the end" if load else ""
    versions = ", ".join(f"{name} {s[name.lower()]}" for name in ("Python", "torch", "transformers", "tokenizers"))
    layers = len(r["cold_experts_per_layer"])
    if spec is None:
        spec_lines = "- Speculative decoding: not measured (moe_spec_compile.speculative unavailable).\n"
    else:
        spec_lines = (
            f"- Exact greedy speculative decoding of the target with the draft ({spec['prompts']} held-out prompts of "
            f"{spec['prompt_len']} tokens,\n  {spec['new_tokens']} new tokens): mean accepted length (tokens per "
            f"verify pass, bonus included) {spec['mean_accepted_chain4']:.2f}\n  with a chain of 4 drafted tokens, "
            f"{spec['mean_accepted_tree16']:.2f} with a 16-token tree (depth 4, top-4 expansion).\n")
    cost_lines = "" if cost is None else (
        f"\n## Per-token cost on the CPU (one decode step with a KV cache after {cost['prompt_len']} tokens, "
        f"{cost['threads']} thread)\n"
        f"- target {cost['target_step_ms']:.2f} ms, draft {cost['draft_step_ms']:.2f} ms: the draft costs "
        f"{cost['draft_over_target']:.2f} of the target per token\n  (medians of {cost['rounds']} alternating rounds "
        f"of {cost['steps']} steps; 1-minute load average {cost['load_average_1min']}).\n")
    return f"""# moespec tiny models

Generated by `python -m moe_spec_compile.tiny.card` from `train_stats.json` (written by the training run) and
`eval_stats.json` (measured by the card script on `heldout_sample.txt`). Load with `msc.load_tiny()`.

## How they were made
    {s['command'].strip()}
- Data: the Python {s['python']} standard library source (`.py` files; see `corpus.py` for what is excluded),
  split by file: sha1(relative path) % 20 == 0 is held out ({s['train_files']} train files,
  {s['train_tokens']:,} tokens; {s['heldout_files']} held-out files, {s['heldout_tokens']:,} tokens).
  `heldout_sample.txt` is a slice of the held-out files (the start of 12 of them).
- Tokenizer: byte-level BPE, {s['vocab']} tokens, trained with `tokenizers` on the train split (`tokenizer.json`).
- Target: transformers Qwen3-MoE, {tcfg.num_hidden_layers} layers, hidden {tcfg.hidden_size},
  {tcfg.num_experts} experts top-{tcfg.num_experts_per_tok} (softmax router, top-k weights
  {'renormalized' if tcfg.norm_topk_prob else 'not renormalized'}), expert intermediate {tcfg.moe_intermediate_size},
  {s['target_params']:,} parameters;
  {s['target_steps']} AdamW steps of {s['batch']}x{s['seq']} tokens, next-token cross-entropy plus
  {tcfg.router_aux_loss_coef} x the load-balancing loss (light, so routing stays skewed);
  {s['target_train_seconds']} s.
- Draft: transformers Qwen3 (dense), {dcfg.num_hidden_layers} layers, hidden {dcfg.hidden_size}, intermediate
  {dcfg.intermediate_size}, {s['draft_params']:,} parameters, same data and tokenizer; {s['draft_steps']} steps of
  (1 - {s['distill']}) x cross-entropy + {s['distill']} x KL(target || draft) against the fp16 target;
  {s['draft_train_seconds']} s.
- Whole run (tokenizer, both models, evaluation): {s['total_seconds']} s wall on {s['cpu_threads']} CPU threads
  ({s['cpu_count']} cores, shared with other work{busy}){'; ' + s['note'] if s.get('note') else ''}; seed {s['seed']};
  {versions}.
- Stored as fp16 safetensors: target {sizes['target']:.1f} MB, draft {sizes['draft']:.1f} MB
  (together {sizes['target'] + sizes['draft']:.1f} MB). `load_tiny()` returns fp32 models unless given a dtype.

## Held-out quality (next-token cross-entropy, nats/token, 64 windows of {s['seq']} tokens over all held-out files)
| model | held-out loss |
|---|---|
| unigram baseline (add-one smoothed train counts) | {s['unigram_heldout_loss']:.3f} |
| target (MoE) | {s['target_heldout_loss']:.3f} (fp16-rounded weights: {s['target_heldout_loss_fp16_weights']:.3f}) |
| draft (dense) | {s['draft_heldout_loss']:.3f} |

The target beats its draft by {s['draft_heldout_loss'] - s['target_heldout_loss']:.3f} nats/token and the unigram
baseline by {s['unigram_heldout_loss'] - s['target_heldout_loss']:.3f}.
{cost_lines}
## Draft against target
- Teacher-forced next-token agreement (same argmax) on the same held-out windows:
  {s['draft_target_top1_agreement']:.1%}.
{spec_lines}
## Routing (held-out slice, {r['windows']} passes of {r['window']} tokens, all {layers} MoE layers)
- Experts holding 90% of the summed router probability mass s_e = sum over the pass's tokens of softmax(router):
  mean {r['experts_for_90pct_mass_mean']:.1f} of {r['experts']} (min {r['experts_for_90pct_mass_min_max'][0]},
  max {r['experts_for_90pct_mass_min_max'][1]}; uniform routing would need {r['experts_for_90pct_mass_if_uniform']}).
- The top half of the experts ({r['experts'] // 2}) hold {r['top_half_mass_share_mean']:.1%} of the mass on average
  (lowest pass-layer {r['top_half_mass_share_min']:.1%}).
- Expert load (share of the top-{r['top_k']} slots) per layer: largest {r['expert_load_max_share_per_layer']}
  (uniform would be {1 / r['experts']:.4f}); cold experts (< {COLD:.0%} of the slots)
  {r['cold_experts_per_layer']}, of which never chosen on this slice {r['unused_experts_per_layer']}.
  The full per-layer loads are in `eval_stats.json`.
{eagle}"""


def render(evals: dict, tcfg, dcfg) -> str:
    """MODEL_CARD.md's text from eval_stats.json's figures and the training runs' train_stats.json files."""
    stats = json.loads((HERE / "train_stats.json").read_text())
    sizes = {name: (HERE / name / "model.safetensors").stat().st_size / 1e6 for name in ("target", "draft")}
    eagle_train = HERE / "eagle3" / "train_stats.json"
    eagle = _eagle_lines(evals.get("eagle3"), json.loads(eagle_train.read_text()) if eagle_train.exists() else None)
    return _card(stats, evals["routing"], evals["speculative"], tcfg, dcfg, sizes, evals.get("cost"), eagle)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m moe_spec_compile.tiny.card")
    p.add_argument("--cost-only", action="store_true",
                   help="remeasure the per-token cost only; keep the other figures of eval_stats.json")
    p.add_argument("--eagle-only", action="store_true",
                   help="measure the EAGLE-3 head's figures only; keep the other figures of eval_stats.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    target, draft, tok = load_tiny()
    ids = torch.tensor(tok(heldout_text())["input_ids"])
    if args.cost_only or args.eagle_only:
        evals = json.loads((HERE / "eval_stats.json").read_text())
        if args.cost_only:
            evals["cost"] = cost_stats(target, draft, ids)
        if args.eagle_only:
            evals["eagle3"] = eagle3_stats(target, draft, ids)
    else:
        evals = {"routing": routing_stats(target, ids), "speculative": speculative_stats(target, draft, ids),
                 "cost": cost_stats(target, draft, ids), "eagle3": eagle3_stats(target, draft, ids)}
        evals["seconds"] = round(time.time() - t0, 1)
    (HERE / "eval_stats.json").write_text(json.dumps(evals, indent=2) + "\n")
    card = render(evals, target.config, draft.config)
    (HERE / "MODEL_CARD.md").write_text(card)
    print(card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
