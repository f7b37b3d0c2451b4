"""Argument checks of the speculative decoder, its drafters and tree shapes: a ValueError naming the argument.

user arguments -> check_* -> the value (normalized) or ValueError("<argument> must be ..., got ...")

Imported by decoder.py, drafters.py, accept.py and tree.py; imports nothing of theirs (no cycle).
"""

from __future__ import annotations

import contextlib
import numbers

import torch

__all__ = ["check_compile_options", "check_int", "check_number", "check_sampling", "check_input_ids", "check_rank",
           "check_tree_fits_vocab", "check_batch"]

# compile options the decoder sets itself for every verify pass: passing them to the backend would be overridden
_DECODER_OWNS = {
    "budget": "pass budget= to SpeculativeDecoder (or to generate()); it binds every verify pass exactly",
    "policy": "pass policy= to SpeculativeDecoder",
    "max_budget_tokens": "the decoder budgets every verify pass whatever its size and keeps the prefill exact",
}


def check_compile_options(options) -> dict:
    """compile_options for backend="moespec": a dict without the options the decoder applies itself."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"compile_options must be a dict of moespec backend options, got {type(options).__name__}")
    for key, how in _DECODER_OWNS.items():
        if key in options:
            raise ValueError(f"compile_options[{key!r}] is not accepted by SpeculativeDecoder: it would be "
                             f"overridden on every verify pass; {how}")
    return dict(options)


def check_int(value, name: str, minimum: int | None = None) -> int:
    """An int (bool refused: True is not a count) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_sampling(do_sample, temperature, top_p, top_k) -> None:
    """generate()'s sampling arguments: temperature > 0 when sampling, top_p in (0, 1], top_k None or an int >= 1."""
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be a bool, got {do_sample!r}")
    temperature = check_number(temperature, "temperature")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling (do_sample=True), got {temperature}")
    top_p = check_number(top_p, "top_p")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k is not None:
        check_int(top_k, "top_k", 1)


def check_input_ids(ids: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Integer token ids (not float, not bool), every id in [0, vocab_size)."""
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"input_ids must be an integer tensor of token ids, got dtype {ids.dtype}")
    if vocab_size is not None and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids must lie in [0, {vocab_size}) (the target's vocabulary), got "
                             f"{lo if lo < 0 else hi}")
    return ids


def check_rank(rank, path) -> int:
    """One child rank of a static tree path: an int >= 0 (0.5 is not truncated to 0)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
        raise ValueError(f"tree paths must hold child ranks that are ints >= 0, got {rank!r} in {path!r}")
    return int(rank)


def check_tree_fits_vocab(shape, vocab_size: int) -> None:
    """Child ranks (a static tree) and top_k (a TreeSpec) below the vocabulary size: rank r is the r-th best
    token, and there are only vocab_size of them."""
    paths = getattr(shape, "paths", None)
    if paths is not None:
        worst = max((r for p in paths for r in p), default=0)
        if worst >= vocab_size:
            raise ValueError(f"tree rank {worst} needs a vocabulary of more than {worst} tokens; the target has "
                             f"{vocab_size}")
    elif getattr(shape, "top_k", 0) > vocab_size:
        raise ValueError(f"tree top_k={shape.top_k} exceeds the target's vocabulary of {vocab_size} tokens")


def check_batch(input_ids: torch.Tensor, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L], mask [B, L] int64) or ValueError: the mask must match input_ids' shape, hold 0/1 only,
    pad on the left (every row's zeros before its ones) and leave every row at least one real token."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(f"input_ids must be [B, L] with B, L >= 1, got shape {tuple(ids.shape)}")
    if attention_mask is None:
        return ids, torch.ones_like(ids, dtype=torch.long)
    mask = torch.as_tensor(attention_mask, device=ids.device)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(ids.shape)}, got {tuple(mask.shape)}")
    mask = mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (tokens) only")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask has right padding (a 0 after a 1 in some row); SpeculativeDecoder "
                         "needs left padding, as transformers' generate does for decoder-only models "
                         "(tokenizer.padding_side = 'left')")
    if bool((mask.sum(1) == 0).any()):
        raise ValueError("attention_mask leaves a row without any token")
    return ids, mask


_WARNED_ENV: set[str] = set()


def _passive_omp(device: torch.device) -> bool:
    import os

    return device.type == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def warn_slow_cpu_environment(device: torch.device) -> str | None:
    """On the CPU, say once per process when the environment carries a setting known to slow moespec's passes
    (it is read when torch loads OpenMP, too late to change from here) and what the decoder does about it -> the
    message, or None.

    OMP_WAIT_POLICY=PASSIVE puts OpenMP's threads to sleep between parallel regions; a verify pass is hundreds
    of small ones, and each then pays a wake-up: an 8-token pass of the bundled target took 24.8 ms with 2 threads
    against 7.9 ms without the setting, and 8.4 ms with 1 thread under it (the larger MoE's 16-token passes: 1
    thread as fast as 2 under it, both 1.1-1.4x the time without it). So the decoder decodes with one thread there
    (passive_omp_threads)."""
    import warnings

    if not _passive_omp(device):
        return None
    msg = ("OMP_WAIT_POLICY=PASSIVE is set: on the CPU it makes moespec's multi-token passes about 3x slower with "
           "more than one thread (OpenMP threads sleep between the many small parallel regions of a pass), so "
           "SpeculativeDecoder.generate runs with torch.set_num_threads(1) (restored after). Unset it, or set "
           "OMP_WAIT_POLICY=ACTIVE, before Python starts; it cannot be changed once torch is loaded.")
    if "omp_wait_policy" not in _WARNED_ENV:
        _WARNED_ENV.add("omp_wait_policy")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg


@contextlib.contextmanager
def passive_omp_threads(device: torch.device):
    """Inside: one intra-op thread where OMP_WAIT_POLICY=PASSIVE is set on the CPU (warn_slow_cpu_environment's
    measurement), the caller's thread count restored after; elsewhere nothing changes."""
    before = torch.get_num_threads()
    if not _passive_omp(device) or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
