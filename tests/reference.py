"""A plain-PyTorch reference of the budget semantics (DESIGN.md), applied to the eager model.

Written apart from moespec's ops: each router's forward is wrapped so that its selection top-k picks
within the budget set (substitute) or its result drops slots outside it (truncate).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def budget_mask(probs: torch.Tensor, c: int) -> torch.Tensor:
    """A: the C experts with the highest summed probability, ties to the lower index (python sort)."""
    e = probs.shape[-1]
    s = probs.reshape(-1, e).float().sum(0).tolist()
    order = sorted(range(e), key=lambda i: (-s[i], i))
    keep = torch.zeros(e, dtype=torch.bool)
    keep[order[:c]] = True
    return keep.to(probs.device)


def _select_within(x: torch.Tensor, keep: torch.Tensor, k: int):
    """Per token: the k best entries of x among A; A's entries masked to -inf by the model rank by index."""
    rows = x.reshape(-1, x.shape[-1]).tolist()
    picked = []
    for row in rows:
        order = sorted(range(len(row)), key=lambda i: (not bool(keep[i]), -row[i], i))
        picked.append(order[:k])
    idx = torch.tensor(picked, device=x.device).reshape(*x.shape[:-1], k)
    return x.gather(-1, idx), idx


def _router_probs(router, hidden) -> torch.Tensor:
    h = hidden.reshape(-1, router.weight.shape[1])
    if hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3: sigmoid router
        return torch.sigmoid(F.linear(h.float(), router.weight.float()))
    bias = getattr(router, "bias", None)
    return torch.softmax(F.linear(h, router.weight, bias).float(), dim=-1)


def _routers(model):
    for module in model.modules():
        cls = type(module).__name__
        if cls.endswith(("TopKRouter", "TopkRouter")):
            yield module, "forward"
        elif hasattr(module, "route") and hasattr(module, "gate"):
            yield module, "route"


@contextlib.contextmanager
def reference_budget(model, c: int, policy: str):
    """Inside: the eager model routes with budget C under `policy`, in plain PyTorch."""
    patched = []
    for router, attr in _routers(model):
        orig = getattr(router, attr)
        gate = router.gate if attr == "route" else router
        num_experts = gate.weight.shape[0]
        top_k = router.top_k

        def wrapped(hidden, *a, _orig=orig, _gate=gate, _e=num_experts, _k=top_k, _attr=attr, **kw):
            keep = budget_mask(_router_probs(_gate, hidden), c)
            if policy == "substitute":
                real_topk = torch.topk

                def topk(x, k=None, dim=-1, largest=True, sorted=True, **kw2):
                    k = kw2.pop("k", k)
                    if x.shape[-1] == _e and k == _k:
                        return torch.return_types.topk(_select_within(x, keep, k))
                    return real_topk(x, k, dim=dim, largest=largest, sorted=sorted)

                torch.topk = topk
                try:
                    return _orig(hidden, *a, **kw)
                finally:
                    torch.topk = real_topk
            out = list(_orig(hidden, *a, **kw))
            w_i, id_i = (0, 1) if _attr == "route" else (1, 2)
            ids = out[id_i]
            drop = ~keep[ids]
            best = int(torch.nonzero(keep)[0])  # any expert of A; its slot weight is zero
            out[w_i] = out[w_i].masked_fill(drop, 0)
            out[id_i] = torch.where(drop, torch.full_like(ids, best), ids)
            return tuple(out)

        setattr(router, attr, wrapped)
        patched.append((router, attr))
    try:
        yield
    finally:
        for router, attr in patched:
            delattr(router, attr)
