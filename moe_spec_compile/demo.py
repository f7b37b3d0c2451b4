"""`make demo` / `moespec demo`: compile a small MoE with the moespec backend and show budgets at work.

config-built Qwen3-MoE (sharpened router) -> explain table -> one verify-sized pass, exact and
under budgets -> experts each layer loaded, and how far the logits moved from the exact model
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import moe_spec_compile as msc


def _model(layers: int, experts: int, top_k: int):
    cfg = transformers.Qwen3MoeConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                      moe_intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32, num_experts=experts,
                                      num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[],
                                      norm_topk_prob=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random routers are nearly uniform; sharpen them as training would
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(8.0)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moespec demo")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32, help="tokens in the verify-sized pass")
    p.add_argument("--budgets", default="4,8,16", help="comma-separated budgets C")
    p.add_argument("--quick", action="store_true", help="eager inner compiler (CI)")
    args = p.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",") if b]
    model = _model(args.layers, args.experts, args.top_k)
    x = torch.randint(0, 512, (1, args.tokens), generator=torch.Generator().manual_seed(1))

    print(f"moespec demo: Qwen3-MoE config, {args.layers} layers, {args.experts} experts, top-{args.top_k}\n")
    print(msc.explain(model, x, use_cache=False).table(), "\n")
    options = {"inner": "eager"} if args.quick else {}
    compiled = torch.compile(model, backend="moespec", options=options)
    with torch.no_grad():
        exact = model(x, use_cache=False).logits
        print(f"{'budget':>8} {'experts per layer':>24} {'max |dlogit|':>13} {'top-1 agree':>12} {'ms':>8}")
        for c in [None, *budgets]:
            for policy in ["substitute"] if c is None else ["substitute", "truncate"]:
                with msc.budget(c, policy=policy):
                    compiled(x, use_cache=False)  # warm-up (compiles the first time)
                    with msc.record_experts() as rec:
                        t0 = time.perf_counter()
                        got = compiled(x, use_cache=False).logits
                        ms = (time.perf_counter() - t0) * 1e3
                used = " ".join(str(len(ev.experts)) for ev in rec.events)
                label = "exact" if c is None else f"{c} {policy[:5]}"
                agree = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
                print(f"{label:>8} {used:>24} {(got - exact).abs().max().item():>13.4f} {agree:>12.2%} {ms:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
