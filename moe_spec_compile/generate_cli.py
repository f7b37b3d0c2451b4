"""`moespec generate`: speculative decoding on the bundled tiny model, or on a config-built random one.

prompt -> tokens -> SpeculativeDecoder(target compiled with backend="moespec", drafter, tree, budget)
       -> generated text (or ids) and the decoding stats

    moespec generate --prompt "Once upon a time" --budget 8 --tree 16,4,4
    moespec generate --config --prompt-ids 5,17,33 --tree 4 --drafter ngram --budget none
"""

from __future__ import annotations

import argparse
import json

import torch
import transformers

__all__ = ["main", "config_models", "parse_tree"]


def config_models(vocab: int = 512, hidden: int = 128, layers: int = 4, experts: int = 32, top_k: int = 4,
                  draft_layers: int = 1, seed: int = 0):
    """(target, draft): a random Qwen3-MoE with sharpened routers (random ones are nearly uniform) and a
    random dense Qwen3 draft sharing its vocabulary. Nothing is downloaded."""
    common = dict(vocab_size=vocab, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=hidden // 4, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    target = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(
        **common, num_hidden_layers=layers, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True)).eval()
    with torch.no_grad():
        for name, p in target.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(8.0)
    draft = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(
        **common, num_hidden_layers=draft_layers, intermediate_size=2 * hidden)).eval()
    return target, draft


def parse_tree(text: str):
    """'4' -> a chain of 4; '32,5,4' -> TreeSpec(total_tokens=32, depth=5, top_k=4)."""
    from .speculative import TreeSpec

    parts = [int(x) for x in text.split(",") if x.strip()]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 3:
        return TreeSpec(*parts)
    raise argparse.ArgumentTypeError(f"--tree takes K or TOTAL,DEPTH,TOP_K, got {text!r}")


def _parse_budget(text: str):
    return None if text.lower() in ("none", "exact") else int(text)


def _bundled():
    """(target, draft, tokenizer) from msc.load_tiny(), or None when it is not available."""
    try:
        from .tiny import load_tiny
    except ImportError:
        return None
    got = load_tiny()
    if isinstance(got, (tuple, list)):
        return tuple(got[:3])
    return got.target, got.draft, getattr(got, "tokenizer", None)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moespec generate", description=__doc__.split("\n")[0])
    p.add_argument("--prompt", default="Once upon a time", help="text (ids from bytes for config-built models)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids, instead of --prompt")
    p.add_argument("--config", action="store_true", help="use a config-built random model, not the bundled one")
    p.add_argument("--tree", type=parse_tree, default=parse_tree("16,4,4"), help="K (a chain) or TOTAL,DEPTH,TOP_K")
    p.add_argument("--drafter", choices=["model", "ngram"], default="model")
    p.add_argument("--budget", type=_parse_budget, default=None, help="experts per layer per verify pass, or none")
    p.add_argument("--policy", choices=["substitute", "truncate"], default="substitute")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="run the target uncompiled (budgets do not bind)")
    p.add_argument("--inner", choices=["auto", "eager", "inductor"], default="auto",
                   help="the backend's inner compiler (auto: inductor on CUDA, eager on the CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print the stats as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    from .speculative import ModelDrafter, NgramDrafter, SpeculativeDecoder

    args = _parser().parse_args(argv)
    bundled = None if args.config else _bundled()
    if bundled is None:
        target, draft = config_models()
        tokenizer, source = None, "config-built random Qwen3-MoE (no bundled model here)"
    else:
        target, draft, tokenizer = bundled
        source = "bundled tiny model"
    target, draft = target.to(args.device), draft.to(args.device)
    vocab = target.config.get_text_config(decoder=True).vocab_size
    if args.prompt_ids:
        ids = [int(x) for x in args.prompt_ids.split(",")]
    elif tokenizer is not None:
        ids = tokenizer(args.prompt)["input_ids"]
    else:
        ids = [b % vocab for b in args.prompt.encode()]
    input_ids = torch.tensor([ids], device=args.device)

    inner = args.inner if args.inner != "auto" else ("inductor" if args.device.startswith("cuda") else "eager")
    drafter = ModelDrafter(draft) if args.drafter == "model" else NgramDrafter()
    dec = SpeculativeDecoder(target, drafter=drafter, tree=args.tree, budget=args.budget, policy=args.policy,
                             compile=not args.no_compile, compile_options={"inner": inner})
    torch.manual_seed(args.seed)
    out = dec.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                       temperature=args.temperature, top_p=args.top_p)
    new = out.sequences[0, len(ids):].tolist()
    summary = out.stats.summary()
    if args.json:
        print(json.dumps({"model": source, "new_token_ids": new, **summary}, default=str))
        return 0
    print(f"model: {source}; tree {args.tree}; budget {args.budget}; drafter {args.drafter}")
    print(tokenizer.decode(new) if tokenizer is not None else f"new token ids: {new}")
    t = summary["time_s"]
    print(f"steps {summary['steps']}, tokens per step {summary['tokens_per_step']}, buckets {summary['buckets']}, "
          f"budget bound in {summary['budget_bound_fraction']} of verify passes")
    print(f"time: prefill {t['prefill']:.3f}s draft {t['draft']:.3f}s verify {t['verify']:.3f}s "
          f"accept {t['accept']:.3f}s total {t['total']:.3f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
