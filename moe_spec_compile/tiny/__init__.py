"""The bundled tiny MoE: a Qwen3-MoE target (fine-grained experts) and a small dense Qwen3 draft trained on the
Python standard library (train.py), with their byte-level BPE tokenizer. Loaded offline from the package.

load_tiny() -> (target, draft, tokenizer); heldout_text() -> prompts_and_heldout() -> prompts and the text to score;
MODEL_CARD.md says how they were made and how good they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["HERE", "load_tiny", "heldout_text", "prompts_and_heldout"]

HERE = Path(__file__).resolve().parent


def load_tiny(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              experts_implementation: str | None = None, root: str | Path | None = None):
    """(target, draft, tokenizer) from the package's files, in eval mode; nothing is downloaded.

    root: another folder laid out as this one (target/, draft/, tokenizer.json), e.g. a training run's --out.
    The checkpoints are stored in fp16; `dtype` is what the models are loaded as (fp32 by default, which
    the CPU computes exactly). experts_implementation: transformers' "grouped_mm" (default), "batched_mm"
    or "eager"."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    here = HERE if root is None else Path(root)
    if not (here / "target" / "model.safetensors").exists():
        raise FileNotFoundError(f"the bundled checkpoints are missing under {here}; "
                                "run `python -m moe_spec_compile.tiny.train` to make them")
    kwargs = {"dtype": dtype, "local_files_only": True}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    target = AutoModelForCausalLM.from_pretrained(here / "target", **kwargs).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(here / "draft", dtype=dtype, local_files_only=True).to(device).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(here / "tokenizer.json"), eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    return target, draft, tokenizer


def heldout_text() -> str:
    """A slice of the held-out split (stdlib files the models never trained on), shipped for tests/demos."""
    return (HERE / "heldout_sample.txt").read_text(encoding="utf-8")


def prompts_and_heldout(tokenizer, n_prompts: int, prompt_len: int):
    """Prompts cut from the held-out slice (files the models never trained on), and the rest for scoring."""
    ids = torch.tensor(tokenizer(heldout_text())["input_ids"])
    stride = ids.numel() // (n_prompts + 1)
    prompts = [ids[i * stride : i * stride + prompt_len] for i in range(n_prompts)]
    return prompts, ids[n_prompts * stride :]
