"""The moespec custom ops in isolation: budget set ties, both policies, fused_experts vs a per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_spec_compile as msc
from moe_spec_compile.budget import budget_set
from moe_spec_compile.ops import fused_experts_torch


def test_budget_set_ties_go_to_lower_index():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3]])  # sums: .35 .55 .55 .55
    assert budget_set(probs, 2).tolist() == [False, True, True, False]
    assert budget_set(probs, 3).tolist() == [False, True, True, True]


def _route(policy, c, x, probs, k):
    with msc.budget(c, policy=policy):
        v, i, remap = torch.ops.moespec.budget_topk(x, probs, k, "identity", c, policy, -1, True)
        ids, w = torch.ops.moespec.budget_apply(i, v, remap, True, x, "blk", c, policy, -1)
    return ids, w


@pytest.mark.parametrize("t,e,k,c", [(1, 8, 2, 3), (13, 17, 4, 5), (32, 64, 8, 16), (5, 4, 4, 4)])
def test_budget_ops_policies(t, e, k, c):
    torch.manual_seed(t * e)
    probs = torch.softmax(torch.randn(t, e) * 3, dim=-1)
    keep = budget_set(probs, max(c, k))
    ids, w = _route("substitute", c, probs, probs, k)
    assert bool(keep[ids].all())  # every slot inside A
    want = torch.topk(probs.masked_fill(~keep, -1), k).values
    torch.testing.assert_close(w.sort(-1, descending=True).values, want)
    ids, w = _route("truncate", c, probs, probs, k)
    nat_v, nat_i = torch.topk(probs, k)
    dropped = ~keep[nat_i]
    assert torch.equal(ids, torch.where(dropped, -1, nat_i))
    torch.testing.assert_close(w, nat_v.masked_fill(dropped, 0))


def _per_token(hidden, ids, weights, wgu, wd, act="silu", bgu=None, bd=None, interleaved=False):
    out = torch.zeros_like(hidden, dtype=torch.float64)
    i = wd.shape[2]
    for t in range(hidden.shape[0]):
        x = hidden[t].double()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gu = wgu[e].double() @ x + (bgu[e].double() if bgu is not None else 0)
            g, u = (gu[0::2], gu[1::2]) if interleaved else (gu[:i], gu[i:])
            if act == "silu":
                a = F.silu(g) * u
            elif act == "gelu":
                a = F.gelu(g) * u
            else:
                g, u = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
                a = (u + 1) * g * torch.sigmoid(1.702 * g)
            y = wd[e].double() @ a + (bd[e].double() if bd is not None else 0)
            out[t] += weights[t, j].double() * y
    return out


@pytest.mark.parametrize("t,e,k,h,i,act,bias", [
    (1, 4, 2, 16, 8, "silu", False),      # a single token
    (7, 5, 2, 20, 12, "gelu", False),     # prime E, H and I not powers of two
    (9, 3, 3, 12, 10, "silu", False),     # k == E
    (6, 4, 2, 16, 8, "swiglu", True),     # GPT-OSS clamped SwiGLU, interleaved, biases
])
def test_fused_experts_torch_matches_per_token_loop(t, e, k, h, i, act, bias):
    torch.manual_seed(0)
    hidden = torch.randn(t, h)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    ids[0, -1] = -1  # an empty slot
    weights = torch.rand(t, k)
    wgu, wd = torch.randn(e, 2 * i, h) / h ** 0.5, torch.randn(e, h, i) / i ** 0.5
    bgu, bd = (torch.randn(e, 2 * i), torch.randn(e, h)) if bias else (None, None)
    name = "swiglu_clamp" if act == "swiglu" else act
    got = torch.ops.moespec.fused_experts(hidden, ids, weights, wgu, wd, name, bgu, bd, bias, 1.702, 7.0, "torch")
    want = _per_token(hidden, ids, weights, wgu, wd, act, bgu, bd, interleaved=bias)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_fused_experts_all_tokens_on_one_expert_and_transposed_weights():
    torch.manual_seed(1)
    hidden, e, h, i = torch.randn(5, 16), 6, 16, 8
    ids = torch.full((5, 2), 3)
    ids[:, 1] = -1
    weights = torch.rand(5, 2)
    wgu_t = torch.randn(e, h, 2 * i)  # stored [E, H, 2I] like GPT-OSS; passed as a transposed view
    wd = torch.randn(e, h, i)
    got = fused_experts_torch(hidden, ids, weights, wgu_t.transpose(1, 2), wd)
    want = _per_token(hidden, ids, weights, wgu_t.transpose(1, 2), wd)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_fused_experts_bad_args():
    h, ids, w = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2)
    wgu, wd = torch.randn(4, 6, 8), torch.randn(4, 8, 3)
    op = torch.ops.moespec.fused_experts
    with pytest.raises(ValueError, match="activation"):
        op(h, ids, w, wgu, wd, "tanh")
    with pytest.raises(ValueError, match="w_down"):
        op(h, ids, w, wgu, torch.randn(4, 8, 4))
    with pytest.raises(ValueError, match="topk_ids"):
        op(h, ids.float(), w, wgu, wd)
    with pytest.raises(ValueError, match="outside"):
        op(h, torch.full((3, 2), 4), w, wgu, wd)
    with pytest.raises(ValueError, match="impl"):
        op(h, ids, w, wgu, wd, impl="cuda")
