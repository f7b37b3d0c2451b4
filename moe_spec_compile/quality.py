"""Quality against budget, for any causal LM the moespec backend rewrites.

for each budget C: speculative decoding (verify passes budgeted) -> (a) greedy agreement with the
unbudgeted target, (b) mean accepted length, tokens/s, experts per layer per verify pass;
held-out windows of T tokens, each scored as one budgeted pass -> (c) loss, next-token accuracy and
agreement of each position's argmax with the exact pass (a teacher-forced, per-position form of (a))

Budget None is the exact target: under it the speculative output equals the target's own greedy decoding,
so (a) is measured against that run. The target is compiled here with backend="moespec". The decoder runs
every verify pass under exactly the requested C (budgets are device data), as the scored windows do.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .budget import budget as budget_ctx
from .budget import pass_counts, tables

__all__ = ["QualityRow", "WindowScore", "greedy_agreement", "score_windows", "speculative_run", "evaluate"]


@dataclass
class WindowScore:
    loss: float  # mean next-token cross-entropy (nats) inside the windows
    accuracy: float  # next-token top-1 accuracy inside the windows
    experts_per_layer: float  # mean distinct experts per MoE block per pass
    predictions: torch.Tensor = field(default=None, repr=False)  # [n * window] argmax at each scored position


@dataclass
class QualityRow:
    budget: int | None
    policy: str
    agreement: float  # (a) fraction of new tokens equal to the unbudgeted greedy output, position by position
    mean_accepted: float  # (b) tokens emitted per verify pass (bonus included)
    tokens_per_s: float
    verify_experts_per_layer: float | None  # mean distinct experts per block per verify pass (None: none recorded)
    budget_bound: float | None  # fraction of verify passes where some block used all C experts
    heldout_loss: float  # (c)
    heldout_accuracy: float  # (c)
    heldout_agreement: float  # held-out positions whose argmax equals the exact pass's (1.0 for budget None)

    def as_dict(self) -> dict:
        return asdict(self)


def greedy_agreement(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> float:
    """Fraction of new tokens equal position by position; a shorter sequence counts its missing tokens as misses."""
    same = total = 0
    for ref, cand in zip(reference, candidate, strict=True):
        ref, cand = ref.reshape(-1).tolist(), cand.reshape(-1).tolist()
        total += max(len(ref), len(cand))
        same += sum(a == b for a, b in zip(ref, cand))
    return same / max(total, 1)


def _compiled(model, options: dict | None):
    opts = {"max_budget_tokens": None, **(options or {})}
    return torch.compile(getattr(model, "_orig_mod", model), backend="moespec", options=opts, dynamic=False)


@torch.no_grad()
def score_windows(model, tokens: torch.Tensor, window: int = 32, budget=None,
                  policy: str = "substitute", max_windows: int = 64, compiled=None,
                  options: dict | None = None, score: str | None = None, decay: float | None = None) -> WindowScore:
    """Score consecutive windows of `window` tokens, each as one forward pass under budget C.

    tokens [N] (held-out text). Each window is scored on its own (no earlier context), the way a verify
    pass sees a block of new tokens: loss and accuracy of predicting token i+1 from tokens <= i.
    score: the budget's expert score ("prob", "topk", "top1"; None: the compiled one); decay: weigh position
    i of a window by decay**i in the expert scores (a chain's depth decay)."""
    compiled = compiled if compiled is not None else _compiled(model, options)
    tokens = tokens.reshape(-1)
    n = min(max_windows, (tokens.numel() - 1) // window)
    if n < 1:
        raise ValueError(f"need at least {window + 1} tokens to score one window, got {tokens.numel()}")
    device = next(getattr(model, "_orig_mod", model).parameters()).device
    loss = correct = count = 0.0
    experts, preds = [], []
    for w in range(n):
        x = tokens[w * window : (w + 1) * window + 1].to(device)
        weights = decay ** torch.arange(window, dtype=torch.float32, device=device) if decay else None
        counters = tables(device)["stats"]
        before = counters.clone()
        with budget_ctx(budget, policy=policy, score=score), _weighted(weights):
            logits = compiled(x[None, :-1], use_cache=False).logits[0].float()
        loss += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
        preds.append(logits.argmax(-1).cpu())
        correct += (preds[-1] == x[1:].cpu()).sum().item()
        count += window
        experts += [n for _block, n, _c in pass_counts(before, counters)]
    return WindowScore(loss / count, correct / count, sum(experts) / max(len(experts), 1), torch.cat(preds))


def _weighted(weights):
    import contextlib

    from .budget import token_weights

    return token_weights(weights) if weights is not None else contextlib.nullcontext()


def speculative_run(decoder, prompts: Sequence[torch.Tensor], budget: int | None, max_new_tokens: int):
    """Run the decoder greedily on each prompt under `budget`: (new token tensors, stats summary)."""
    outs, steps, emitted, experts, bound, seconds = [], 0, 0, [], [], 0.0
    for prompt in prompts:
        prompt = prompt.reshape(1, -1)
        t0 = time.perf_counter()
        out = decoder.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, budget=budget)
        seconds += time.perf_counter() - t0
        outs.append(out.sequences[0, prompt.shape[1]:].cpu())
        steps += out.stats.steps
        emitted += sum(out.stats.accepted_per_step)
        for v in out.stats.verify:
            if v.experts_per_layer:
                experts += list(v.experts_per_layer.values())
            if v.budget_bound is not None and v.budget is not None:  # exact passes (also auto's) never bind
                bound.append(v.budget_bound)
    summary = {
        "mean_accepted": emitted / max(steps, 1),
        "tokens_per_s": sum(o.numel() for o in outs) / max(seconds, 1e-9),
        "verify_experts_per_layer": sum(experts) / len(experts) if experts else None,  # None: nothing recorded
        "budget_bound": sum(bound) / len(bound) if bound and budget is not None else None,
    }
    return outs, summary


def evaluate(target, drafter, prompts: Sequence[torch.Tensor], heldout: torch.Tensor, budgets: Sequence,
             policy: str = "substitute", tree=None, max_new_tokens: int = 32, window: int = 32,
             max_windows: int = 32, compile_options: dict | None = None) -> list[QualityRow]:
    """One QualityRow per budget (None first: the exact reference for agreement).

    prompts: token tensors [L] for (a) and (b); heldout [N] for (c); drafter: e.g. msc.ModelDrafter(draft)."""
    from .speculative import SpeculativeDecoder, TreeSpec

    tree = tree if tree is not None else TreeSpec(total_tokens=16, depth=4, top_k=4)
    budgets = [None] + [b for b in budgets if b is not None]
    decoder = SpeculativeDecoder(target, drafter=drafter, tree=tree, policy=policy, compile=True,
                                 compile_options=compile_options)  # every verify pass runs at exactly C
    scorer = _compiled(target, compile_options)
    speculative_run(decoder, prompts, None, max_new_tokens)  # warm-up: compile each tree-size bucket, untimed
    rows, reference, exact = [], None, None
    for c in budgets:
        outs, summary = speculative_run(decoder, prompts, c, max_new_tokens)
        scores = score_windows(target, heldout, window, c, policy, max_windows, compiled=scorer)
        if reference is None:
            reference, exact = outs, scores.predictions
        rows.append(QualityRow(c, policy, greedy_agreement(reference, outs), summary["mean_accepted"],
                               summary["tokens_per_s"], summary["verify_experts_per_layer"],
                               summary["budget_bound"], scores.loss, scores.accuracy,
                               (scores.predictions == exact).float().mean().item()))
    return rows
