"""Issue 24 (first part): expert offloading, R = E/4 resident per layer, on the CPU.

    python -P benchmarks/bench_offload.py [--quick] [--batch 16] [--out FILE]

Part A, eviction policies on real routing traces: the bundled target decodes held-out prompts (autoregressive, and
speculative chain 4 with the bundled draft) under msc.record_experts; each layer's per-pass expert sets are replayed
through the cache policies of moe_spec_compile.offload (SlotCache: LRU, LFU) and Belady's optimal offline policy
(the bound), at R = E/4.
Part B, end to end, side by side in one run, identical greedy tokens checked: the same R = E/4 offload (a host
store behind a simulated 25 GB/s tier, Throttled: figures through it are a simulation; and the real disk tier, a
safetensors file read through mmap) for: on-demand LRU without speculation (mixtral-offloading's scheme), moespec's
plain decoding (tree=0) with the LFU cache, and speculative decoding with the same cache (chain 4: the bundled draft
on the bundled target, the oracle drafter at acceptance 0.8 on a config MoE with hidden 1024, 64 experts top-8; and
msc.SelfDrafter, the target drafting on its resident experts, with and without prefetch, with LFU + draft
scores, exact and with verify passes under C = R, alone and preferring resident experts). Targets
uncompiled except the budgeted row (moespec graph, inner eager): bytes moved per emitted token, tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from pathlib import Path

import torch
import transformers

import moe_spec_compile as msc
from moe_spec_compile.offload import DiskStore, HostStore, SlotCache, Throttled, belady_hits
from moe_spec_compile.small_models import config_models
from moe_spec_compile.tiny import load_tiny, prompts_and_heldout

PCIE4 = 25e9
PREFER_BONUS = 1.0  # handle.prefer_resident(bonus) in the row that prefers resident experts


def experts_of(model) -> int:
    cfg = model.config
    return getattr(cfg, "num_experts", None) or cfg.num_local_experts


def traces(target, draft, prompts, new_tokens: int) -> dict:
    """{decoding: {block: [needed experts per pass]}}: what each pass of the target needed (every expert resident,
    so the trace is the routing's own; prefill passes included)."""
    out = {}
    handle = msc.offload_experts(target, resident=1.0)
    try:
        for name, drafter, tree in (("autoregressive", msc.NgramDrafter(), 0),
                                    ("chain 4, bundled draft", msc.ModelDrafter(draft), 4)):
            dec = msc.SpeculativeDecoder(target, drafter, tree=tree)
            handle.record_trace()
            for p in prompts:
                dec.generate(p, max_new_tokens=new_tokens, eos_token_id=None)
            out[name] = handle.traces()
    finally:
        handle.restore()
    return out


def policy_table(tr: dict, slots: int) -> list[str]:
    lines = ["| decoding | passes per layer | LRU hit rate | LFU hit rate | Belady (optimal) |",
             "|---|---|---|---|---|"]
    for name, per in tr.items():
        tot = {"lru": [0, 0], "lfu": [0, 0], "belady": [0, 0]}
        for trace in per.values():
            for policy in ("lru", "lfu"):
                c = SlotCache(slots, policy)
                for needed in trace:
                    c.plan(needed)
                tot[policy][0] += c.hits
                tot[policy][1] += c.hits + c.misses
            h, m = belady_hits(trace, slots)
            tot["belady"][0] += h
            tot["belady"][1] += h + m
        rate = {k: v[0] / max(v[1], 1) for k, v in tot.items()}
        lines.append(f"| {name} | {len(next(iter(per.values())))} | {rate['lru']:.3f} | {rate['lfu']:.3f} | "
                     f"{rate['belady']:.3f} |")
    return lines


def run_row(target, make_drafter, dec_kwargs, policy, store, prompts, new_tokens, resident):
    """One row; dec_kwargs' "prefer" (a bonus) runs it inside handle.prefer_resident(bonus)."""
    dec_kwargs = dict(dec_kwargs)
    bonus = dec_kwargs.pop("prefer", None)
    handle = msc.offload_experts(target, resident=resident, store=store, policy=policy)
    try:
        with handle.prefer_resident(bonus) if bonus else contextlib.nullcontext():
            dec = msc.SpeculativeDecoder(target, make_drafter(target), **dec_kwargs)
            dec.generate(prompts[0], max_new_tokens=new_tokens, eos_token_id=None)  # untimed: compiles every shape
            before = sum(s["loaded_bytes"] for s in handle.stats().values())
            t0 = time.perf_counter()
            seqs, emitted = [], 0
            for p in prompts:
                out = dec.generate(p, max_new_tokens=new_tokens, eos_token_id=None)
                seqs.append(out.sequences)
                emitted += out.stats.new_tokens
            seconds = time.perf_counter() - t0
        moved = sum(s["loaded_bytes"] for s in handle.stats().values()) - before
        st = handle.stats().values()
        hits, misses = sum(s["hits"] for s in st), sum(s["misses"] for s in st)
        pre, used = sum(s["prefetched"] for s in st), sum(s["prefetched_used"] for s in st)
    finally:
        handle.restore()
    return {"tok_s": emitted / seconds, "bytes_per_tok": moved / emitted, "seqs": seqs,
            "hit_rate": hits / max(hits + misses, 1), "prefetch": f"{used}/{pre}" if pre else "-"}


def end_to_end(label, target, spec_drafter, prompts, new_tokens, resident, stores) -> list[str]:
    ngram = lambda _t: msc.NgramDrafter()  # noqa: E731  (drafts nothing at tree=0)
    rows = [("on-demand LRU, no speculation", ngram, {"tree": 0}, "lru"),
            ("moespec tree=0, LFU", ngram, {"tree": 0}, "lfu"),
            ("chain 4, " + spec_drafter[0], spec_drafter[1], {"tree": 4}, "lfu"),
            ("chain 4, self-drafter", msc.SelfDrafter, {"tree": 4}, "lfu"),
            ("chain 4, self-drafter, LFU + draft scores", msc.SelfDrafter, {"tree": 4}, "lfu+draft"),
            ("chain 4, self-drafter + prefetch", lambda t: msc.SelfDrafter(t, prefetch=True), {"tree": 4}, "lfu"),
            (f"chain 4, self-drafter, C = {resident}", msc.SelfDrafter,
             {"tree": 4, "budget": resident, "compile": True, "compile_options": {"inner": "eager"}}, "lfu"),
            (f"chain 4, self-drafter, C = {resident}, prefer resident (bonus {PREFER_BONUS:g})", msc.SelfDrafter,
             {"tree": 4, "budget": resident, "compile": True, "compile_options": {"inner": "eager"},
              "prefer": PREFER_BONUS}, "lfu")]
    lines = [f"### {label}", "", "| store | row | tok/s | x LRU | MB moved per token | x LRU | hit rate | "
             "prefetched used / loaded | same tokens as LRU |", "|---|---|---|---|---|---|---|---|---|"]
    for store_name, make_store in stores:
        got = {name: run_row(target, make, kw, policy, make_store(), prompts, new_tokens, resident)
               for name, make, kw, policy in rows}
        base = got[rows[0][0]]
        for name, r in got.items():
            same = all(torch.equal(a, b) for a, b in zip(r["seqs"], base["seqs"]))
            lines.append(f"| {store_name} | {name} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}x | "
                         f"{r['bytes_per_tok'] / 1e6:.2f} | {r['bytes_per_tok'] / max(base['bytes_per_tok'], 1):.2f}x"
                         f" | {r['hit_rate']:.3f} | {r['prefetch']} | {same} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 prompts x 32 tokens")
    ap.add_argument("--out", default=None, help="default benchmarks/results/offload_cpu.md (offload_batchB_cpu.md)")
    ap.add_argument("--batch", type=int, default=1, help="B > 1: part B only, one request of B held-out prompts, "
                                                           "the simulated tier only")
    args = ap.parse_args()
    batched = args.batch > 1
    args.out = args.out or f"benchmarks/results/offload{f'_batch{args.batch}' if batched else ''}_cpu.md"
    n_prompts, new_tokens = (args.batch, 32 if args.quick else 64) if batched else (2, 32) if args.quick else (3, 64)
    load0 = os.getloadavg()
    target, draft, tok = load_tiny()[:3]
    prompts = [q[None] for q in prompts_and_heldout(tok, n_prompts, 32)[0]]
    rows = (lambda ps: [torch.cat(ps)]) if batched else (lambda ps: ps)  # one request of B rows, or B requests
    e = experts_of(target)
    r = max(1, e // 4)
    lines = ["# Expert offloading on the CPU, R = E/4 resident per layer", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, transformers {transformers.__version__}. Command: `python -P "
             f"benchmarks/bench_offload.py{' --quick' if args.quick else ''}"
             f"{f' --batch {args.batch}' if batched else ''}`. {n_prompts} held-out prompts "
             f"{'in one batch ' if batched else ''}x {new_tokens} new tokens, greedy, targets uncompiled.", ""]
    if not batched:
        lines += [f"## A. Eviction policies on the bundled target's routing traces ({e} experts, R = {r})", ""]
        lines += policy_table(traces(target, draft, prompts, new_tokens), r)
        lines += ["", "Hit rate = experts a pass needed that were resident / all it needed (per layer per pass, "
                  "deduplicated over the pass's tokens).", ""]
    lines += ["## B. End to end", "",
              "25 GB/s: a host store behind Throttled (a SIMULATED tier: each load takes at least bytes / 25 GB/s); "
              "disk: a safetensors file read through mmap (the real tier; the file is in the page cache after its "
              "first read).", ""]
    stores = [("25 GB/s (simulated)", lambda: Throttled(HostStore(), PCIE4))] + ([] if batched else
                                                                               [("disk (mmap)", DiskStore)])
    lines += end_to_end(f"Bundled target ({e} experts, R = {r})", target,
                        ("bundled dense draft", lambda _t: msc.ModelDrafter(draft)), rows(prompts), new_tokens, r,
                        stores)
    big, _ = config_models(vocab=512, hidden=1024, layers=2, experts=64, top_k=8)
    big_prompts = [torch.randint(1, 512, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(n_prompts)]
    oracle = msc.OracleDrafter(big, acceptance=0.8, seed=0)
    oracle.precompute(big_prompts, new_tokens)  # on the in-memory model, before any offload
    lines += end_to_end("Config MoE (Qwen3-MoE, hidden 1024, 64 experts top-8, 2 layers, R = 16)", big,
                        ("oracle at acceptance 0.8", lambda _t: oracle), rows(big_prompts), new_tokens, 16, stores)
    load1 = os.getloadavg()
    lines += [f"Load average {load0[0]:.2f} before, {load1[0]:.2f} after."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
