"""Plain-PyTorch references: the budget semantics (DESIGN.md) applied to the eager model, and the experts
computation one token at a time in fp64 (per_token_reference).

Written apart from moespec's ops: each router's forward is wrapped so that its selection top-k picks
within the budget set (substitute) or its result drops slots outside it (truncate).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from moe_spec_compile.budget import DEFAULT_SCORE  # the package default: a setting, not semantics


def budget_mask(probs: torch.Tensor, c: int, score: str = "prob", x: torch.Tensor | None = None, k: int = 0,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """A: the C experts with the highest score, ties to the lower index (python sort). Scores, one token at a
    time: prob = sum_t w_t p_t,e; topk = the same over each token's own top-k of x, renormalized per token;
    top1 = prob, with every expert that is some token's top-1 ranked before all others."""
    e = probs.shape[-1]
    rows = probs.reshape(-1, e).double().tolist()
    xs = x.reshape(-1, e).double().tolist() if x is not None else rows
    w = weights.reshape(-1).tolist() if weights is not None else [1.0] * len(rows)
    s = [0.0] * e
    first = set()
    for row, xrow, wt in zip(rows, xs, w):
        natural = sorted(range(e), key=lambda i: (-xrow[i], i))[:k] if k else []
        if score == "topk":
            total = sum(row[i] for i in natural)
            for i in natural:
                s[i] += wt * row[i] / total
        else:
            for i in range(e):
                s[i] += wt * row[i]
        if natural:
            first.add(natural[0])
    order = sorted(range(e), key=lambda i: (score == "top1" and i not in first, -s[i], i))
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


def _router_x(router, hidden, probs) -> torch.Tensor:
    """What the model's top-k selects on: the probabilities, or for DeepSeek-V3 the bias-corrected sigmoid with
    the groups outside each token's best topk_group groups (group score: its 2 best experts) at -inf."""
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is None:
        return probs
    x = probs + bias
    groups = getattr(router, "num_group", 1) or 1
    if groups > 1:
        e = x.shape[-1]
        per = x.reshape(-1, groups, e // groups)
        best = per.topk(2, dim=-1).values.sum(-1)  # [T, groups]
        chosen = torch.zeros_like(best).scatter(1, best.topk(router.topk_group, dim=-1).indices, 1.0).bool()
        x = per.masked_fill(~chosen[..., None], float("-inf")).reshape(x.shape)
    return x


def _routers(model):
    for module in model.modules():
        cls = type(module).__name__
        if cls.endswith(("TopKRouter", "TopkRouter")):
            yield module, "forward"
        elif hasattr(module, "route") and hasattr(module, "gate"):
            yield module, "route"


def _per_router(c, index: int, name: str):
    if isinstance(c, dict):
        return c.get(name)
    if isinstance(c, list | tuple):
        return c[index] if index < len(c) else None
    return c


@contextlib.contextmanager
def reference_budget(model, c, policy: str, score: str = DEFAULT_SCORE, weights: torch.Tensor | None = None):
    """Inside: the eager model routes with budget C under `policy`, in plain PyTorch. c: an int, a list in layer
    order or a dict {block name: C}; a router whose C is None (or >= E) stays exact. weights [T]: each token's
    weight in the expert scores (msc.token_weights), over the pass's flattened tokens."""
    patched = []
    names = {id(m): n for n, m in model.named_modules()}
    for index, (router, attr) in enumerate(_routers(model)):
        orig = getattr(router, attr)
        gate = router.gate if attr == "route" else router
        num_experts = gate.weight.shape[0]
        top_k = router.top_k
        block = names[id(router)].rsplit(".", 1)[0] if attr == "forward" else names[id(router)]
        c_here = _per_router(c, index, block)
        if c_here is None or c_here >= num_experts:
            continue
        c_here = max(c_here, top_k)

        def wrapped(hidden, *a, _orig=orig, _gate=gate, _e=num_experts, _k=top_k, _attr=attr, _c=c_here, **kw):
            probs = _router_probs(_gate, hidden)
            keep = budget_mask(probs, _c, score, _router_x(_gate, hidden, probs), _k, weights)
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


def _act(gate, up, activation, alpha=1.702, limit=7.0):
    if activation == "silu":
        return gate * torch.sigmoid(gate) * up
    if activation == "gelu":
        return 0.5 * gate * (1 + torch.erf(gate / 2**0.5)) * up
    if activation == "gelu_tanh":
        return 0.5 * gate * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate**3))) * up
    if activation == "relu":
        return gate.clamp(min=0) * up
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def per_token_reference(x, ids, tw, wgu, wd, activation="silu", bgu=None, bd=None, interleaved=False):
    """out[t] = sum_j tw[t,j] * (w_down[e] @ act(gate[e] @ x_t, up[e] @ x_t) + b_down[e]), one token at a time, fp64."""
    t_, h = x.shape
    i = wgu.shape[1] // 2
    out = torch.zeros(t_, h, dtype=torch.float64)
    for t in range(t_):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gu = wgu[e].double() @ x[t].double()  # [2I]
            if bgu is not None:
                gu = gu + bgu[e].double()
            gate, up = (gu[0::2], gu[1::2]) if interleaved else (gu[:i], gu[i:])
            y = wd[e].double() @ _act(gate, up, activation)  # [H]
            if bd is not None:
                y = y + bd[e].double()
            out[t] += float(tw[t, j]) * y
    return out
