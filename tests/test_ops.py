"""The moespec custom ops in isolation: budget set ties, both policies, fused_experts vs a per-token loop."""

from __future__ import annotations

import pytest
import torch

import moe_spec_compile as msc
from moe_spec_compile.budget import budget_set, register_spec
from moe_spec_compile.ops import fused_experts_torch

from reference import per_token_reference


def test_budget_set_ties_go_to_lower_index():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3]])  # sums: .35 .55 .55 .55
    assert budget_set(probs, 2).tolist() == [False, True, True, False]
    assert budget_set(probs, 3).tolist() == [False, True, True, True]


def _route(policy, c, x, probs, k):
    with msc.budget(c, policy=policy):
        v, i, keep = torch.ops.moespec.budget_topk(x, probs, k, "identity", register_spec(c), policy, -1, True)
        ids, w = torch.ops.moespec.budget_apply(i, v, keep, True)
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
    want = per_token_reference(hidden, ids, weights, wgu, wd, name, bgu, bd, interleaved=bias)
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
    want = per_token_reference(hidden, ids, weights, wgu_t.transpose(1, 2), wd)
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


def _case(t=6, e=5, k=2, h=12, i=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    ids[0, -1] = -1
    weights = torch.rand(t, k, generator=gen).to(dtype)
    gate, up = torch.randn(e, i, h, generator=gen) / h ** 0.5, torch.randn(e, i, h, generator=gen) / h ** 0.5
    down = torch.randn(e, h, i, generator=gen) / i ** 0.5
    return hidden, ids, weights, gate.to(dtype), up.to(dtype), down.to(dtype)


def test_gate_and_up_apart_and_listed_experts_equal_the_stacked_op():
    """w_up (gpt-fast's w1/w3 kept apart) and fused_experts_list (a ModuleList) read the model's own tensors."""
    hidden, ids, weights, gate, up, down = _case()
    want = per_token_reference(hidden, ids, weights, torch.cat([gate, up], 1), down)
    apart = torch.ops.moespec.fused_experts(hidden, ids, weights, gate, down, "silu", None, None, False, 1.702, 7.0,
                                            "torch", up)
    listed = torch.ops.moespec.fused_experts_list(hidden, ids, weights, list(gate), list(up), list(down))
    torch.testing.assert_close(apart.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(listed.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="down"):
        torch.ops.moespec.fused_experts_list(hidden, ids, weights, list(gate), list(up), [d[:, :-1] for d in down])


def test_every_op_passes_opcheck():
    hidden, ids, weights, gate, up, down = _case()
    wgu = torch.cat([gate, up], 1)
    x = torch.randn(6, 5) * 3
    samples = [
        (torch.ops.moespec.fused_experts.default, (hidden, ids, weights, wgu, down)),
        (torch.ops.moespec.fused_experts.default, (hidden.requires_grad_(), ids, weights, gate, down, "silu", None,
                                                   None, False, 1.702, 7.0, "torch", up)),
        (torch.ops.moespec.fused_experts_list.default, (hidden, ids, weights, list(gate), list(up), list(down))),
        (torch.ops.moespec.budget_topk.default, (x.requires_grad_(), x, 2, "softmax", register_spec(3), "substitute",
                                                 -1, True, None)),
        (torch.ops.moespec.budget_topk.default, (x, x, 2, "softmax", register_spec(3), "truncate", -1, True,
                                                 torch.tensor([[0, 1, 1, 1, 1, 1]]))),
        (torch.ops.moespec.budget_apply.default, (ids.clamp(min=0), weights.requires_grad_(),
                                                  torch.tensor([1, 0, 1, 1, 0]), True)),
        (torch.ops.moespec.budget_apply.default, (ids.clamp(min=0), weights, torch.tensor([1, 0, 1, 1, 0]), False)),
    ]
    for op, args in samples:
        # opcheck's aot test sums the outputs into a Python 0 in place: an int64 first output (budget_apply's ids)
        # makes it fail on its own arithmetic; budget_apply's gradients are checked in test_gradients_are_exact.
        skip = op is torch.ops.moespec.budget_apply.default and args[1].requires_grad
        utils = [u for u in ("test_schema", "test_autograd_registration", "test_faketensor",
                             "test_aot_dispatch_dynamic") if not (skip and u == "test_aot_dispatch_dynamic")]
        torch.library.opcheck(op, args, test_utils=utils)


def test_gradients_are_exact():
    """Training through the ops: gradients equal finite differences (fp64), budgeted routing included."""
    case = _case(t=4, e=4, h=6, i=4)
    hidden, ids, weights, gate, up, down = (t.double() if t.is_floating_point() else t for t in case)
    wgu = torch.cat([gate, up], 1)
    args = [a.clone().requires_grad_() for a in (hidden, weights, wgu, down)]
    assert torch.autograd.gradcheck(lambda x, w, a, b: torch.ops.moespec.fused_experts(x, ids, w, a, b), args)
    listed = [hidden.clone().requires_grad_(), weights.clone().requires_grad_(), *[g.clone().requires_grad_()
                                                                                  for g in (*gate, *up, *down)]]
    e = gate.shape[0]
    assert torch.autograd.gradcheck(lambda x, w, *ws: torch.ops.moespec.fused_experts_list(
        x, ids, w, list(ws[:e]), list(ws[e:2 * e]), list(ws[2 * e:])), listed)
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def route(v):
        vals, idx, keep = torch.ops.moespec.budget_topk(v, v, 2, "softmax", register_spec(3), "truncate", -1, True)
        return torch.ops.moespec.budget_apply(idx, torch.softmax(vals, -1), keep, True)[1]

    assert torch.autograd.gradcheck(route, (logits,))


def test_truncate_fills_dropped_slots_with_distinct_experts_of_the_budget_set():
    """For models whose own experts code counts tokens per expert (JetMoE), a token never sees a duplicate id."""
    torch.manual_seed(3)
    x = torch.randn(40, 12) * 3
    vals, idx, keep = torch.ops.moespec.budget_topk(x, x, 4, "softmax", register_spec(5), "truncate", -1, True)
    ids, w = torch.ops.moespec.budget_apply(idx, vals, keep, False)
    assert int(keep.sum()) == 5
    assert bool(keep[ids].bool().all())  # every id inside A
    assert all(len(set(row)) == 4 for row in ids.tolist())  # distinct per token
    dropped = keep[idx] == 0
    assert dropped.any() and torch.equal(w, vals.masked_fill(dropped, 0))
    assert torch.equal(ids[~dropped], idx[~dropped])


def test_padding_does_not_vote():
    """budget_topk with the attention mask: tokens marked 0 do not change the budget set."""
    torch.manual_seed(4)
    x = torch.randn(2, 6, 10) * 3
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    y = x.clone()
    y[0, :2] = torch.randn(2, 10) * 9  # other padding content
    keeps = [torch.ops.moespec.budget_topk(v.reshape(-1, 10), v.reshape(-1, 10), 2, "softmax", register_spec(3),
                                           "substitute", -1, True, mask)[2] for v in (x, y)]
    assert torch.equal(*keeps)
    plain = [torch.ops.moespec.budget_topk(v.reshape(-1, 10), v.reshape(-1, 10), 2, "softmax", register_spec(3),
                                           "substitute", -1, True, None)[2] for v in (x, y)]
    assert not torch.equal(*plain)  # the case is one where padding would have changed A


@pytest.mark.parametrize("bias,w_up,t", [(False, False, 5), (True, False, 5), (False, True, 5), (False, False, 40)])
def test_grouped_gemm_equals_the_expert_loop(monkeypatch, bias, w_up, t):
    """fp32 on the CPU runs torch's grouped GEMM instead of a Python loop over experts: same result, empty slots
    and experts without tokens included."""
    from moe_spec_compile import experts_op

    torch.manual_seed(1)
    e, k, h, i = 6, 3, 20, 12
    hidden, weights = torch.randn(t, h), torch.rand(t, k)
    ids = torch.stack([torch.randperm(e - 1)[:k] for _ in range(t)])  # expert e-1 gets no tokens
    ids[1, 0] = -1
    wgu = torch.randn(e, i if w_up else 2 * i, h) / h ** 0.5
    wu = torch.randn(e, i, h) / h ** 0.5 if w_up else None
    wd = torch.randn(e, h, i) / i ** 0.5
    bgu, bd = (torch.randn(e, 2 * i), torch.randn(e, h)) if bias else (None, None)
    args = (hidden, ids, weights, wgu, wd, "silu", bgu, bd, False, 1.702, 7.0, wu)
    assert experts_op._grouped_gemm_ok(hidden, wgu, wd, wu)
    with torch.no_grad():
        grouped = experts_op.fused_experts_torch(*args)
        monkeypatch.setattr(experts_op, "GROUPED_GEMM", False)
        looped = experts_op.fused_experts_torch(*args)
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-6)
    assert grouped.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expert_gemm_equals_x_times_w_transposed(dtype):
    """_mm_t runs fp32 weights of 256 KB and more through oneDNN on the CPU, others through matmul: every row
    count, strided rows included, is x @ w.T within the dtype's tolerance; large experts take the loop, not torch's
    grouped GEMM."""
    from moe_spec_compile import experts_op

    torch.manual_seed(3)
    for out, inp in ((48, 40), (256, 256)):  # below and at experts_op.ONEDNN_WEIGHT_BYTES in fp32
        w = torch.randn(out, inp, dtype=dtype) / inp ** 0.5  # [out, in]
        for n in (1, 2, 3, 5, 8, 17):
            for x in (torch.randn(n, inp, dtype=dtype), torch.randn(inp, n, dtype=dtype).t()):  # contiguous or not
                for ww in (w, w.t().contiguous().t()):  # the weight stored [in, out] too (a transposed view)
                    got = experts_op._mm_t(x, ww)
                    assert got.shape == (n, out)
                    torch.testing.assert_close(got, x @ w.t(), rtol=1e-5, atol=1e-5)
    big = torch.empty(4, 512, 1024)  # 3 MB experts: the loop over used experts
    assert not experts_op._grouped_gemm_ok(torch.empty(2, 1024), big, torch.empty(4, 1024, 256), None)


def _op_and_gradients_equal_dense(base, ids, tol):
    """fused_experts through the op with gradients on (base: hidden, weights, w_gate_up, w_down) against the dense
    reference: the output and every input's gradient (each nonzero) equal within tol."""
    from moe_spec_compile import experts_op

    got_args = [a.clone().requires_grad_() for a in base]
    ref_args = [a.clone().requires_grad_() for a in base]
    got = torch.ops.moespec.fused_experts(got_args[0], ids, *got_args[1:])
    ref = experts_op._dense(ref_args[0], ids, *ref_args[1:], "silu", None, None, False, 1.702, 7.0, None)
    torch.testing.assert_close(got, ref, **tol)
    grad = torch.randn_like(got)
    got.backward(grad)
    ref.backward(grad)
    for a, b in zip(got_args, ref_args):
        assert a.grad is not None and a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, **tol)


def test_large_experts_loop_in_grad_mode_and_bf16():
    """Experts of 512 KB and more take the loop through _mm_t (oneDNN for fp32): under grad mode the op's gradients
    equal the dense reference's, and bf16 weights (upcast per used expert) match fp32 within bf16's tolerance."""
    from moe_spec_compile import experts_op

    torch.manual_seed(4)
    e, k, h, i, t = 4, 2, 256, 256, 6  # 768 KB per fp32 expert
    hidden, weights = torch.randn(t, h), torch.rand(t, k)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    ids[2, 1] = -1
    wgu, wd = torch.randn(e, 2 * i, h) / h ** 0.5, torch.randn(e, h, i) / i ** 0.5
    assert not experts_op._grouped_gemm_ok(hidden, wgu, wd, None)
    _op_and_gradients_equal_dense((hidden, weights, wgu, wd), ids, dict(rtol=1e-4, atol=1e-5))
    with torch.no_grad():
        half = torch.ops.moespec.fused_experts(hidden.bfloat16(), ids, weights.bfloat16(), wgu.bfloat16(),
                                               wd.bfloat16())
        full = torch.ops.moespec.fused_experts(hidden.bfloat16().float(), ids, weights.bfloat16().float(),
                                               wgu.bfloat16().float(), wd.bfloat16().float())
    assert half.dtype == torch.bfloat16 and full.abs().sum() > 0
    torch.testing.assert_close(half.float(), full, rtol=1.6e-2, atol=1e-2)



def test_large_experts_loop_keeps_the_gemm_measured_faster(monkeypatch):
    """The loop over large fp32 experts times oneDNN's and MKL's GEMM on its first calls (alternating, ROUNDS each)
    and keeps the faster per (shapes, rows per expert bucket, threads); every call equals the dense reference."""
    from moe_spec_compile import experts_op

    if not experts_op._ONEDNN:
        pytest.skip("no oneDNN in this torch: MKL is the only GEMM")
    now = [0.0]
    monkeypatch.setattr(experts_op, "LOOP_GEMM", experts_op._FasterGemm(clock=lambda: now[0]))
    mm_t, used = experts_op._mm_t, []

    def costing(onednn_s, mkl_s):  # _mm_t on a virtual clock: each product costs this many seconds
        def timed_mm_t(x, w, onednn=None):
            used.append(onednn)
            now[0] += onednn_s if onednn else mkl_s
            return mm_t(x, w, onednn)
        return timed_mm_t

    monkeypatch.setattr(experts_op, "_mm_t", costing(4.0, 1.0))
    torch.manual_seed(6)
    e, k, h, i, t = 4, 2, 256, 256, 6  # 768 KB per fp32 expert: the loop, both GEMMs candidates
    hidden, weights = torch.randn(t, h), torch.rand(t, k)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    wgu, wd = torch.randn(e, 2 * i, h) / h ** 0.5, torch.randn(e, h, i) / i ** 0.5
    want = experts_op._dense(hidden, ids, weights, wgu, wd, "silu", None, None, False, 1.702, 7.0, None)
    per_call = []
    for _ in range(2 * experts_op._FasterGemm.ROUNDS + 2):
        used.clear()
        with torch.no_grad():
            got = torch.ops.moespec.fused_experts(hidden, ids, weights, wgu, wd)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        per_call.append(set(used))
    rounds = 2 * experts_op._FasterGemm.ROUNDS
    assert per_call[:rounds] == [{True}, {False}] * experts_op._FasterGemm.ROUNDS  # measuring: alternate
    assert per_call[rounds:] == [{False}, {False}] and list(experts_op.LOOP_GEMM.kept.values()) == [False]
    monkeypatch.setattr(experts_op, "LOOP_GEMM", experts_op._FasterGemm(clock=lambda: now[0]))
    monkeypatch.setattr(experts_op, "_mm_t", costing(1.0, 4.0))  # another machine: oneDNN the faster
    for _ in range(rounds + 1):
        with torch.no_grad():
            torch.ops.moespec.fused_experts(hidden, ids, weights, wgu, wd)
    assert list(experts_op.LOOP_GEMM.kept.values()) == [True]


# weight layouts, activations and dtypes the small-pass paths are checked on against the loop over experts
_SMALL_PASS_VARIANTS = [(False, False, False, "silu", torch.float32),
                        (True, False, True, "swiglu_clamp", torch.float32),
                        (False, True, False, "gelu", torch.float32), (True, False, False, "silu", torch.float16),
                        (False, True, False, "silu", torch.bfloat16)]


@pytest.mark.parametrize("bias,w_up,inter,act,dtype", _SMALL_PASS_VARIANTS)
def test_small_passes_in_few_experts_equal_the_expert_loop(monkeypatch, bias, w_up, inter, act, dtype):
    """A small CPU pass routed inside a few experts (a budgeted pass: every slot in the budget set) gathers each used
    expert once and runs every token through all of them, each token weighted only by its own slots: same result as
    the loop over experts; empty slots add exactly 0, an unused expert holding NaN is never read, and a pass whose
    slots spread over many experts (or a single token) stays per slot."""
    from moe_spec_compile import experts_op

    torch.manual_seed(3)
    e, k, h, i, t = 16, 2, 20, 12, 6
    budget_set = torch.tensor([3, 7, 11])  # 12 slots in 3 experts
    hidden, weights = torch.randn(t, h).to(dtype), torch.rand(t, k).to(dtype)
    ids = torch.stack([budget_set[torch.randperm(3)[:k]] for _ in range(t)])
    ids[2, 1] = -1  # an empty slot (truncate policy)
    wgu = (torch.randn(e, i if w_up else 2 * i, h) / h ** 0.5).to(dtype)
    wgu[0] = float("nan")  # an expert no slot uses, the one an empty slot would index after clamping
    wu = (torch.randn(e, i, h) / h ** 0.5).to(dtype) if w_up else None
    wd = (torch.randn(e, h, i) / i ** 0.5).to(dtype)
    bgu, bd = ((torch.randn(e, 2 * i).to(dtype), torch.randn(e, h).to(dtype)) if bias else (None, None))
    args = (hidden, ids, weights, wgu, wd, act, bgu, bd, inter, 1.702, 7.0, wu)
    calls = []
    monkeypatch.setattr(experts_op, "_per_expert", lambda *a, f=experts_op._per_expert: calls.append(a[1]) or f(*a))
    with torch.no_grad():
        got = experts_op.fused_experts_torch(*args)
        assert len(calls) == 1 and calls[0].tolist() == budget_set.tolist(), "the per-expert path did not run"
        monkeypatch.setattr(experts_op, "PER_SLOT", False)
        monkeypatch.setattr(experts_op, "GROUPED_GEMM", False)
        looped = experts_op.fused_experts_torch(*args)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
           torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}[dtype]
    assert torch.isfinite(got).all() and got.abs().sum() > 0
    torch.testing.assert_close(got, looped, **tol)
    # the rule: at most half as many experts as slots, at most 4k of them, two tokens or more
    assert experts_op._used_experts(torch.arange(12).view(6, 2), e) is None  # 12 slots in 12 experts
    assert experts_op._used_experts(torch.tensor([[3, 7]]), e) is None  # one token
    assert experts_op._used_experts(torch.tensor([[3, 7], [7, 3], [3, 7], [7, -1]]), e).tolist() == [3, 7]
    assert experts_op._used_experts((torch.arange(20) % 10)[:, None], e) is None  # k = 1: 10 experts > 4k
    assert experts_op._used_experts((torch.arange(20) % 4)[:, None], e).tolist() == [0, 1, 2, 3]


def test_small_pass_in_few_experts_under_grad_mode(monkeypatch):
    """Through the op with gradients on: a small pass inside a few experts runs its forward on the per-expert path,
    and its output and gradients equal the dense reference's (an empty slot included)."""
    from moe_spec_compile import experts_op

    torch.manual_seed(5)
    e, k, h, i, t = 16, 2, 20, 12, 6
    budget_set = torch.tensor([2, 9, 13])
    ids = torch.stack([budget_set[torch.randperm(3)[:k]] for _ in range(t)])
    ids[4, 0] = -1
    base = (torch.randn(t, h), torch.rand(t, k), torch.randn(e, 2 * i, h) / h ** 0.5, torch.randn(e, h, i) / i ** 0.5)
    calls = []
    monkeypatch.setattr(experts_op, "_per_expert", lambda *a, f=experts_op._per_expert: calls.append(a[1]) or f(*a))
    _op_and_gradients_equal_dense(base, ids, dict(rtol=1e-5, atol=1e-5))
    assert len(calls) == 1 and calls[0].tolist() == budget_set.tolist(), "the per-expert path did not run"


@pytest.mark.parametrize("bias,w_up,inter,act,dtype", _SMALL_PASS_VARIANTS)
def test_small_passes_per_slot_equal_the_expert_loop(monkeypatch, bias, w_up, inter, act, dtype):
    """Small passes of small experts gather each slot's expert weights and batch the GEMMs (no loop over experts):
    same result as the loop, empty slots add exactly 0 even when the expert they would index holds NaN; large
    experts (MBs each) are never copied per slot."""
    from moe_spec_compile import experts_op

    torch.manual_seed(2)
    e, k, h, i, t = 16, 2, 20, 12, 4  # 8 slots <= E/2
    hidden, weights = torch.randn(t, h).to(dtype), torch.rand(t, k).to(dtype)
    ids = torch.stack([torch.randperm(e - 1)[:k] + 1 for _ in range(t)])  # expert 0 gets no tokens
    ids[1, 0] = -1
    wgu = (torch.randn(e, i if w_up else 2 * i, h) / h ** 0.5).to(dtype)
    wgu[0] = float("nan")  # an empty slot must not read it into the output
    wu = (torch.randn(e, i, h) / h ** 0.5).to(dtype) if w_up else None
    wd = (torch.randn(e, h, i) / i ** 0.5).to(dtype)
    bgu, bd = ((torch.randn(e, 2 * i).to(dtype), torch.randn(e, h).to(dtype)) if bias else (None, None))
    args = (hidden, ids, weights, wgu, wd, act, bgu, bd, inter, 1.702, 7.0, wu)
    calls = []
    monkeypatch.setattr(experts_op, "_per_slot", lambda *a, f=experts_op._per_slot: calls.append(1) or f(*a))
    with torch.no_grad():
        slots = experts_op.fused_experts_torch(*args)
        assert calls, "the per-slot path did not run"
        monkeypatch.setattr(experts_op, "PER_SLOT", False)
        monkeypatch.setattr(experts_op, "GROUPED_GEMM", False)
        looped = experts_op.fused_experts_torch(*args)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=2e-3),
           torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}[dtype]  # both paths round the fp32 result once
    big = torch.empty(e, 2 * 512, 1024, dtype=dtype)  # 4 MB experts: gathering 8 of them costs more than it saves
    assert not experts_op._per_slot_pays(ids, big, big.transpose(1, 2)[:, :, :512], None)
    # the rule's bounds: at most 2E slots, at most PER_SLOT_GATHER_BYTES gathered (a 98 KB expert: the bundled
    # target's 5- and 17-token passes, 30 and 102 slots of E = 64, gather; 129 slots do not)
    wgu98, wd98 = torch.empty(64, 64, 256), torch.empty(64, 256, 32)
    assert all(experts_op._per_slot_pays(torch.zeros(n, 6, dtype=torch.long), wgu98, wd98, None) for n in (1, 5, 17))
    assert not experts_op._per_slot_pays(torch.zeros(129, 1, dtype=torch.long), wgu98, wd98, None)
    wgu384, wd384 = torch.empty(64, 128, 512), torch.empty(64, 512, 64)  # 384 KB: 16 MB hold 42 slots
    assert experts_op._per_slot_pays(torch.zeros(42, 1, dtype=torch.long), wgu384, wd384, None)
    assert not experts_op._per_slot_pays(torch.zeros(43, 1, dtype=torch.long), wgu384, wd384, None)
    assert torch.isfinite(slots).all() and slots.abs().sum() > 0
    torch.testing.assert_close(slots, looped, **tol)
