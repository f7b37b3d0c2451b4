"""Which MoE blocks the moespec backend finds in a model, which it rewrites (budgeted routing, fused experts) and why
it declines the others.

arguments (checked first) -> the model (--model PATH, --config NAME or the bundled target) -> msc.explain on random
tokens (../explain.py) -> the table, or one line saying why it could not run

    moespec explain                            # the bundled tiny target
    moespec explain --config DeepseekV3Config  # a small random model of that family
    moespec explain --model path/to/checkpoint --experts-implementation eager
"""

from __future__ import annotations

import sys

import torch

from ..explain import explain
from .args import check_device, config_class, model_dir, new_parser, positive_int, quiet_loading

__all__ = ["main"]


def _parser():
    p = new_parser("moespec explain", __doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=model_dir, metavar="PATH", help="a local checkpoint directory "
                     "(default: the bundled tiny target)")
    src.add_argument("--config", type=config_class, metavar="NAME", help="a transformers config class name, e.g. "
                     "DeepseekV3Config: a small random model of that family")
    p.add_argument("--experts-implementation", choices=("grouped_mm", "batched_mm", "eager"), default=None,
                   help="transformers' experts implementation (default: the model's own)")
    p.add_argument("--tokens", type=positive_int, default=16, help="length of the random example input")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p


def main(argv=None) -> int:
    """`moespec explain [--model PATH | --config NAME]`: the table of MoE blocks found, rewritten or declined."""
    p = _parser()
    args = p.parse_args(argv)
    check_device(p, args.device)
    model, source = _load_for_explain(args)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
    print(f"explaining {source} on {args.tokens} random tokens", file=sys.stderr)
    try:
        report = explain(model.to(args.device), ids, use_cache=False)
    except Exception as exc:  # a model dynamo or the passes cannot handle: one line, not a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"moespec explain: could not compile and run {source}: {type(exc).__name__}: {first}",
              file=sys.stderr)
        return 1
    print(report.table())
    return 0


def _load_for_explain(args):
    """(model, words saying what it is) for --model PATH, --config NAME, or the bundled target."""
    import transformers

    if args.config:
        from ..small_models import build_small

        try:
            model = build_small(args.config, args.experts_implementation)
        except Exception as exc:
            raise SystemExit(f"moespec explain: cannot build a causal LM from {args.config}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        return model, f"a small random {args.config} model"
    kwargs = {} if args.experts_implementation is None else {"experts_implementation": args.experts_implementation}
    if args.model:
        with quiet_loading():
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, **kwargs)
        return model.eval(), f"the checkpoint in {args.model}"
    from ..tiny import HERE

    with quiet_loading():
        model = transformers.AutoModelForCausalLM.from_pretrained(HERE / "target", local_files_only=True,
                                                                  dtype=torch.float32, **kwargs)
    return model.eval(), "the bundled tiny target (no --model or --config given)"
