"""`moespec generate`: speculative decoding of a prompt on the bundled tiny MoE, a local checkpoint, or a small
random model built from a transformers config class.

arguments (all checked first) -> target + drafter -> SpeculativeDecoder(target compiled with backend="moespec",
tree, budget) -> the prompt with its continuation, tokens/s and the decoding stats (or --json)

    moespec generate --prompt "def main(argv):" --budget 16 --tree 16,4,4
    moespec generate --model path/to/checkpoint --draft path/to/draft --budget 16
    moespec generate --config Qwen3MoeConfig --prompt-ids 5,17,33 --tree 4 --budget none
    moespec generate --drafter eagle3 --tree 4                  # the bundled target's shipped EAGLE-3 head
    moespec generate --model path/to/checkpoint --eagle path/to/eagle3-head --tree 16,4,4
    torchrun --nproc-per-node 2 -m moe_spec_compile.commands generate --model path/to/checkpoint --parallel ep
        (the target sharded by transformers' expert / tensor parallel plan; every rank decodes, rank 0 prints)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import transformers

from ..distributed import LAYOUTS
from ..small_models import build_small, config_models
from .args import (
    budget_arg,
    check_device,
    config_class,
    model_dir,
    new_parser,
    positive_int,
    quiet_loading,
    resident_arg,
    tree_arg,
)

__all__ = ["main", "bundled"]


def bundled():
    """(target, draft, tokenizer) from msc.load_tiny(), loaded quietly, or None when the bundled files are missing."""
    from ..tiny import load_tiny

    try:
        with quiet_loading():
            got = load_tiny()
    except FileNotFoundError:
        return None
    return tuple(got[:3])


def _parser():
    p = new_parser("moespec generate", __doc__)
    src = p.add_argument_group("model (default: the bundled tiny Qwen3-MoE and its dense draft)")
    src.add_argument("--model", type=model_dir, metavar="PATH", help="a local checkpoint directory for the target")
    src.add_argument("--config", type=config_class, metavar="NAME",
                     help="a transformers config class name: a small random target of that family")
    src.add_argument("--draft", type=model_dir, metavar="PATH",
                     help="a local checkpoint directory for the draft model (same tokenizer as the target)")
    p.add_argument("--prompt", default="def main(argv):", help="the prompt text")
    p.add_argument("--prompt-ids", default=None, metavar="IDS", help="comma-separated token ids, instead of --prompt")
    src.add_argument("--eagle", type=model_dir, metavar="PATH",
                     help="a local EAGLE-3 head directory (EAGLE / SpecForge or speculators format) for the target")
    p.add_argument("--drafter", choices=("auto", "model", "ngram", "eagle3"), default="auto",
                   help="model: the draft model; ngram: prompt lookup; eagle3: an EAGLE-3 head (--eagle PATH, or the "
                        "bundled target's own); auto: eagle3 with --eagle, else model when there is a draft model")
    p.add_argument("--tree", type=tree_arg, default="16,4,4",
                   help="K (a chain of K drafted tokens; 0 = no speculation, plain decoding as a baseline) "
                        "or TOTAL,DEPTH,TOP_K (a dynamic tree)")
    p.add_argument("--budget", type=budget_arg, default=None,
                   help="experts per MoE layer per verify pass (an integer >= 1), or none (exact)")
    p.add_argument("--policy", choices=("substitute", "truncate"), default="substitute",
                   help="what a token whose experts fall outside the budget gets")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample; > 0")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample; in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="run the target uncompiled (a budget is then refused)")
    p.add_argument("--inner", choices=("auto", "eager", "inductor"), default="auto",
                   help="the backend's inner compiler (auto: inductor on CUDA, eager on the CPU)")
    p.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="untimed runs first, so the tokens/s leaves out compilation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token ids and stats")
    p.add_argument("--offload", type=resident_arg, default=None, metavar="R",
                   help="keep R experts per MoE layer resident (an integer, or a share of the layer's experts in "
                        "(0, 1]) and the rest in --offload-store (msc.offload_experts)")
    p.add_argument("--offload-store", choices=("host", "disk"), default="host",
                   help="with --offload: host memory, or a safetensors file read through mmap")
    p.add_argument("--parallel", choices=LAYOUTS, default=None,
                   help="under torchrun (WORLD_SIZE > 1, with --model): how transformers shards the target over the "
                        "ranks: ep (experts split, the rest replicated; the default there), tp (tensor parallel "
                        "plan), tp+ep (both)")
    return p


def world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check(p, args) -> None:
    """Every check that needs no model: one-line errors (exit 2) before anything is loaded."""
    check_device(p, args.device)
    if args.model and args.config:
        p.error("--model PATH and --config NAME both name the target; give one")
    if args.drafter == "model" and (args.model or args.config) and not args.draft:
        p.error("--drafter model needs --draft PATH with --model or --config (or use --drafter ngram)")
    if args.draft and args.drafter == "ngram":
        p.error("--draft PATH is a draft model; it goes with --drafter model or auto, not ngram")
    if args.eagle and args.drafter in ("model", "ngram"):
        p.error(f"--eagle PATH is an EAGLE-3 head; it goes with --drafter eagle3 or auto, not {args.drafter}")
    if args.drafter == "eagle3" and not args.eagle and (args.model or args.config):
        p.error("--drafter eagle3 needs --eagle PATH with --model or --config (the shipped head fits the bundled "
                "target only)")
    if args.prompt_ids is not None:
        try:
            args.prompt_ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            p.error(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}")
        if not args.prompt_ids or min(args.prompt_ids) < 0:
            p.error("--prompt-ids: give at least one token id, each >= 0")
    elif not args.prompt:
        p.error("--prompt: give some text (or --prompt-ids)")
    if args.sample and not args.temperature > 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    if args.sample and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.parallel and world_size() == 1:
        p.error("--parallel shards the target over the ranks torchrun starts; run under torchrun --nproc-per-node W")
    if world_size() > 1 and not args.model:
        p.error("under torchrun give the target as --model PATH (transformers shards a checkpoint as it loads it)")
    if args.tree == 0:
        print("note: --tree 0 drafts nothing: no speculation, plain decoding, one token per target pass (the baseline)",
              file=sys.stderr)


def _load(args):
    """(target, draft or None, tokenizer or None, words describing the target)."""
    if args.config:
        return build_small(args.config), None, None, f"a small random {args.config} model"
    if args.model:
        with quiet_loading():
            target = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                                       **_sharding(args)).eval()
            tokenizer = _tokenizer(args.model)
        return target, None, tokenizer, f"the checkpoint in {args.model}"
    pair = bundled()
    if pair is None:
        target, draft = config_models()
        return target, draft, None, "a random Qwen3-MoE (the bundled checkpoints are missing)"
    target, draft, tokenizer = pair
    return target, draft, tokenizer, "the bundled tiny Qwen3-MoE"


def _sharding(args) -> dict:
    """from_pretrained's keywords for the ranks torchrun started ({} in a single process)."""
    if world_size() == 1:
        return {}
    from ..distributed import distributed_config

    try:
        return {"distributed_config": distributed_config(args.parallel or "ep", world_size())}
    except ValueError as exc:
        raise SystemExit(f"moespec generate: --parallel: {exc}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer(path: str):
    """The checkpoint's own tokenizer, or None when the directory holds none (never a guessed one)."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None


def _prompt_ids(args, tokenizer, vocab: int) -> list[int]:
    if args.prompt_ids is not None:
        if max(args.prompt_ids) >= vocab:
            raise SystemExit(f"moespec generate: --prompt-ids: ids must be < the vocabulary size {vocab}")
        return args.prompt_ids
    if tokenizer is not None:
        return tokenizer(args.prompt)["input_ids"]
    print("note: no tokenizer for this model; the prompt's bytes are the token ids", file=sys.stderr)
    return [b % vocab for b in args.prompt.encode()]


def _decoder(args, target, draft):
    from ..speculative import ModelDrafter, NgramDrafter, SpeculativeDecoder

    if args.draft:
        with quiet_loading():
            draft = transformers.AutoModelForCausalLM.from_pretrained(args.draft, local_files_only=True).eval()
    kind = "eagle3" if args.eagle or args.drafter == "eagle3" else \
        "model" if args.drafter == "model" or (args.drafter == "auto" and draft is not None) else "ngram"
    inner = args.inner if args.inner != "auto" else ("inductor" if args.device.startswith("cuda") else "eager")
    try:
        if kind == "eagle3":
            from ..eagle3 import Eagle3Drafter
            from ..tiny import HERE

            drafter = Eagle3Drafter.from_pretrained(args.eagle or HERE / "eagle3", target)
        else:
            drafter = ModelDrafter(draft.to(args.device)) if kind == "model" else NgramDrafter()
        dec = SpeculativeDecoder(target, drafter=drafter, tree=args.tree, budget=args.budget, policy=args.policy,
                                 compile=not args.no_compile, compile_options={"inner": inner})
    except (ValueError, NotImplementedError) as exc:
        raise SystemExit(f"moespec generate: {exc}") from None
    return dec, kind


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    finally:
        _finish()
    if world_size() > 1:
        # under torchrun, leave without interpreter teardown: there gloo's worker threads could abort a process that
        # had finished its work ("terminate called without an active exception", after destroy_process_group; seen
        # once in a loaded test run, cf. pytorch/pytorch#190489), failing a run whose output is complete
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check(p, args)
    print("loading the model ...", file=sys.stderr, flush=True)
    target, draft, tokenizer, source = _load(args)
    if world_size() > 1:  # transformers placed each rank's shard; rank 0 alone prints
        args.device = str(next(target.parameters()).device)
        if int(os.environ.get("RANK", "0")) != 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    target = target.to(args.device)
    offload = None
    if args.offload is not None:
        from ..offload import offload_experts

        try:
            offload = offload_experts(target, resident=args.offload, store=args.offload_store)
        except ValueError as exc:
            raise SystemExit(f"moespec generate: --offload: {exc}") from None
    vocab = target.config.get_text_config(decoder=True).vocab_size
    ids = _prompt_ids(args, tokenizer, vocab)
    try:
        return _generate(args, target, draft, tokenizer, source, ids, offload)
    finally:
        if offload is not None:
            offload.restore()


def _generate(args, target, draft, tokenizer, source, ids, offload) -> int:
    dec, drafter = _decoder(args, target, draft)
    input_ids = torch.tensor([ids], device=args.device)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                  top_p=args.top_p)
    for i in range(args.warmup):
        print(f"warm-up run {i + 1}/{args.warmup} (compiles the verify passes) ...", file=sys.stderr, flush=True)
        dec.generate(input_ids, **kwargs)
    compiling = "" if args.warmup or args.no_compile else " (the first run compiles: slower)"
    print(f"generating {args.max_new_tokens} tokens{compiling} ...", file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    out = dec.generate(input_ids, **kwargs)
    seconds = time.perf_counter() - t0
    new = out.sequences[0, len(ids):].tolist()
    text = tokenizer.decode(ids + new) if tokenizer is not None else None
    new_text = tokenizer.decode(new) if tokenizer is not None else None
    tokens_per_s = len(new) / max(seconds, 1e-9)
    if args.json:
        print(json.dumps({"model": source, "drafter": drafter, "tree": str(args.tree), "budget": args.budget,
                          "text": text, "new_text": new_text, "prompt_ids": ids, "new_token_ids": new,
                          "seconds": round(seconds, 4), "tokens_per_s": round(tokens_per_s, 2),
                          "stats": out.stats.summary(),
                          "offload": offload.stats() if offload is not None else None}, default=str))
        return 0
    print(f"model: {source}; drafter: {drafter}; tree: {args.tree}; budget: {args.budget or 'none (exact)'}")
    print("-" * 72)
    print(text if text is not None else f"prompt ids {ids} -> new token ids {new}")
    print("-" * 72)
    print(f"{len(new)} new tokens in {seconds:.2f} s: {tokens_per_s:.1f} tokens/s{compiling}")
    print(out.stats)
    if offload is not None:
        s = offload.stats().values()
        hits, misses = sum(b["hits"] for b in s), sum(b["misses"] for b in s)
        print(f"offload: {next(iter(s))['slots']} experts resident per layer ({args.offload_store} store); "
              f"{hits} hits, {misses} misses (hit rate {hits / max(hits + misses, 1):.3f}), "
              f"{sum(b['loaded_bytes'] for b in s) / 1e6:.1f} MB loaded")
    return 0


def _finish() -> None:
    """Under torchrun: leave the process group transformers opened when it sharded the target."""
    import torch.distributed as dist

    if world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
