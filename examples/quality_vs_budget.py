"""What a budget costs in quality: held-out text scored under budgets C, each 32-token window one pass.

load_tiny() -> heldout_text() -> score_windows(budget C) for C in (None, E/8, E/4, E/2) -> loss, accuracy,
experts per layer, and how often each position's argmax equals the exact pass's
(quality.evaluate does the same plus speculative decoding runs; `moespec demo` prints and plots both)
"""

import torch

import moe_spec_compile as msc
from moe_spec_compile.quality import score_windows
from moe_spec_compile.tiny import heldout_text

target, _, tok = msc.load_tiny()
tokens = torch.tensor(tok(heldout_text())["input_ids"])  # text the models never trained on
compiled = torch.compile(target, backend="moespec", options={"inner": "eager", "max_budget_tokens": None})

exact = None
print(f"{'budget':>6} {'experts/layer':>13} {'loss':>6} {'accuracy':>8} {'same argmax':>11}")
e = target.config.num_experts
for c in (None, e // 8, e // 4, e // 2):
    s = score_windows(target, tokens, window=32, budget=c, max_windows=8, compiled=compiled)
    exact = s.predictions if exact is None else exact
    same = (s.predictions == exact).float().mean().item()
    print(f"{c or 'exact':>6} {s.experts_per_layer:>13.1f} {s.loss:>6.3f} {s.accuracy:>8.1%} {same:>11.1%}")
