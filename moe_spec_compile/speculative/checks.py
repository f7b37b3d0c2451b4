"""Argument checks of the speculative decoder, its drafters and tree shapes: a ValueError naming the argument.

user arguments -> check_* -> the value (normalized) or ValueError("<argument> must be ..., got ...")

Imported by decoder.py, drafters.py and tree.py; imports nothing of theirs (no cycle).
"""

from __future__ import annotations

__all__ = ["check_compile_options"]

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
