"""What a hostile user tried (issue: never silently wrong), each as a test: weights changed after compiling, a
second instance, bf16 layouts, padding in the budget, the default inductor path in grad mode, training,
JetMoE, listed experts of different sizes, routers without one top-k, sigmoid after top-k, bad kernel input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import moe_spec_compile as msc

from moe_models import VOCAB, ModuleListMoE, TinyLM, build, sharpen


def _close(a, b, dtype=torch.float32):
    tol = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 4e-2}[dtype]
    scale = max(1.0, b.float().abs().max().item())
    err = (a.float() - b.float()).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol * scale:.3g}"


def _ids(n, seed=0, batch=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["gpt_fast", "module_list"])
def test_weights_changed_after_compiling_and_a_second_instance(family):
    """Items 1 and 6: default inductor path; load_state_dict after compiling; a second instance of the class."""
    torch._dynamo.reset()
    first, _, k = build(family, "plain", seed=0)
    second, _, _ = build(family, "plain", seed=1)
    x = _ids(12)
    c1 = torch.compile(first, backend="moespec")
    _close(c1(x).logits, first(x).logits)
    first.load_state_dict(second.state_dict())  # new weights, same tensors updated in place
    _close(c1(x).logits, first(x).logits)
    third, _, _ = build(family, "plain", seed=2)
    c3 = torch.compile(third, backend="moespec")
    _close(c3(x).logits, third(x).logits)
    _close(c1(x).logits, first(x).logits)
    with msc.budget(k + 1), msc.record_experts() as rec:
        c3(x)
    assert rec.events and max(len(ev.experts) for ev in rec.events) <= k + 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpt_oss_layout_in_16_bit(dtype):
    """Item 2: the layout comes from structure and an fp32 check, so bf16 cannot pick a wrong candidate."""
    torch._dynamo.reset()
    model, _, _ = build("gpt_oss", "grouped_mm", dtype=dtype)
    x = _ids(16)
    report = msc.explain(model, x)
    assert [b.experts for b in report.blocks] == ["fused_experts (swiglu_clamp interleaved, biases)"] * 2, report
    compiled = torch.compile(model, backend="moespec", options={"inner": "eager"})
    with torch.no_grad():
        _close(compiled(x).logits, model(x).logits, dtype)


def test_padding_does_not_vote_in_the_budget_set():
    """Item 3: in a left-padded batch under a budget, the pad token's id does not change real positions."""
    torch._dynamo.reset()
    model, _, k = build("qwen3_moe", "grouped_mm")
    compiled = torch.compile(model, backend="moespec", options={"budget": k + 1, "inner": "eager"})
    x = _ids(10, batch=2)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    outs = []
    for pad in (0, 17, 90):
        y = x.clone()
        y[0, :4] = pad
        with torch.no_grad():
            outs.append(compiled(y, attention_mask=mask, use_cache=False).logits)
    for other in outs[1:]:
        _close(other[0, 4:], outs[0][0, 4:])
        _close(other[1], outs[0][1])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
                                    "gpt_fast", "module_list"])
def test_default_inductor_path_in_grad_mode(family):
    """Items 6 and 7: the default compile path, parameters requiring grad, no torch.no_grad(): exact without a
    budget, capped with one; the README's own example."""
    torch._dynamo.reset()
    impl = "plain" if family in ("gpt_fast", "module_list") else "grouped_mm"
    model, e, k = build(family, impl)
    assert all(p.requires_grad for p in model.parameters())
    compiled = torch.compile(model, backend="moespec")
    x = _ids(12)
    kw = {} if impl == "plain" else {"use_cache": False}
    _close(compiled(x, **kw).logits, model(x, **kw).logits)
    with msc.budget(k + 1), msc.record_experts() as rec:
        compiled(x, **kw)
    assert len(rec.events) == 2 and max(len(ev.experts) for ev in rec.events) <= k + 1


def test_training_gradients_equal_eager():
    """Item 7: backward through the compiled model (no budget) gives the eager model's gradients."""
    torch._dynamo.reset()
    model, _, _ = build("gpt_fast", "plain")
    x = _ids(8)
    model(x).logits.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.compile(model, backend="moespec")(x).logits.square().mean().backward()
    for n, p in model.named_parameters():
        _close(p.grad, want[n])


def _jetmoe():
    cfg = transformers.JetMoeConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_key_value_heads=2,
                                    kv_channels=12, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                    max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_jetmoe_truncate_and_attention_head_routers():
    """Item 8: truncate with experts code that counts tokens per expert; attention-head routers named as such."""
    torch._dynamo.reset()
    model = _jetmoe()
    x = _ids(12)
    report = msc.explain(model, x)
    names = [b.name for b in report.blocks]
    assert names == ["model.layers.0.mlp", "model.layers.0.self_attention.experts", "model.layers.1.mlp",
                     "model.layers.1.self_attention.experts"], report
    assert all(("attention heads" in b.router) == ("attention" in b.name) for b in report.blocks)
    compiled = torch.compile(model, backend="moespec", options={"budget": 3, "policy": "truncate", "inner": "eager"})
    with torch.no_grad(), msc.record_experts() as rec:
        out = compiled(x).logits
    assert torch.isfinite(out).all() and len(rec.events) == 4
    assert all(len(ev.experts) <= 3 for ev in rec.events)
    with torch.no_grad(), msc.budget(8):
        _close(compiled(x).logits, model(x).logits)


class _Uneven(ModuleListMoE):
    def __init__(self, dim=48, inter=32, num_experts=8, top_k=2):
        super().__init__(dim, inter, num_experts, top_k)
        self.experts[3].gate_proj = nn.Linear(dim, inter + 8, bias=False)
        self.experts[3].up_proj = nn.Linear(dim, inter + 8, bias=False)
        self.experts[3].down_proj = nn.Linear(inter + 8, dim, bias=False)


def test_listed_experts_of_different_sizes_are_left_alone():
    """Item 9: no crash; the experts keep the model's code (routing still budgeted), and explain says why."""
    torch._dynamo.reset()
    model = TinyLM(_Uneven).eval()
    x = _ids(10)
    report = msc.explain(model, x)
    assert all(b.rewritten and b.experts == "model code" and "differ in size" in b.reason for b in report.blocks)
    with torch.no_grad():
        _close(torch.compile(model, backend="moespec")(x).logits, model(x).logits)


class _ArgmaxMoE(nn.Module):
    """Selection by repeated argmax with masking: no torch.topk anywhere."""

    def __init__(self, dim=48, inter=32, num_experts=6, top_k=2):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, inter, dim) * dim ** -0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, inter) * inter ** -0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, inter, dim) * dim ** -0.5)
        self.top_k = top_k

    def forward(self, x):
        b, s, h = x.shape
        x = x.view(-1, h)
        probs = F.softmax(self.gate(x), dim=-1)
        out = torch.zeros_like(x)
        masked = probs
        for _ in range(self.top_k):
            idx = masked.argmax(-1)  # [T]
            w = probs.gather(-1, idx[:, None])  # [T, 1]
            y = torch.einsum("ti,toi->to", x, self.w1[idx])
            y = F.silu(y) * torch.einsum("ti,toi->to", x, self.w3[idx])
            out = out + w * torch.einsum("to,tio->ti", y, self.w2[idx])
            masked = masked.scatter(-1, idx[:, None], -1.0)
        return out.view(b, s, h)


class _SigmoidAfterTopk(nn.Module):
    """top-k on raw logits, then a sigmoid of the chosen values; stacked experts."""

    def __init__(self, dim=48, inter=32, num_experts=8, top_k=2):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * inter, dim) * dim ** -0.5)
        self.down_proj = nn.Parameter(torch.randn(num_experts, dim, inter) * inter ** -0.5)
        self.top_k = top_k

    def route(self, x):
        logits = self.gate(x)
        values, ids = torch.topk(logits, self.top_k, dim=-1)
        return torch.sigmoid(values), ids

    def forward(self, x, keep=None):
        b, s, h = x.shape
        x = x.view(-1, h)
        if keep is None:
            weights, ids = self.route(x)
        else:  # the reference: top-k within the budget set A
            logits = self.gate(x).masked_fill(~keep, float("-inf"))
            values, ids = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.sigmoid(values)
        gu = torch.einsum("th,tkoh->tko", x, self.gate_up_proj[ids])  # [T, k, 2I]
        g, u = gu.chunk(2, dim=-1)
        y = torch.einsum("tko,tkho->tkh", F.silu(g) * u, self.down_proj[ids])  # [T, k, H]
        return torch.einsum("tkh,tk->th", y, weights).view(b, s, h)


def test_routers_without_one_topk_are_listed_with_their_expert_count():
    """Item 10: a block selecting by argmax is listed (declined, with its 6 experts), its output untouched."""
    torch._dynamo.reset()
    model = TinyLM(_ArgmaxMoE, num_experts=6).eval()
    x = _ids(9)
    report = msc.explain(model, x)
    assert [(b.name, b.num_experts, b.rewritten) for b in report.blocks] == [("moes.0", 6, False), ("moes.1", 6, False)]
    assert all("no router top-k" in b.reason for b in report.blocks)
    with torch.no_grad():
        _close(torch.compile(model, backend="moespec")(x).logits, model(x).logits)


def test_sigmoid_after_topk_router_is_budgeted_by_its_sigmoid():
    """Item 10: score = the sigmoid of every logit; A = the C best; substitute = top-k within A."""
    torch._dynamo.reset()
    block = _SigmoidAfterTopk().eval()
    sharpen(block, 8.0)
    x = torch.randn(1, 10, 48)
    report = msc.explain(block, x)
    assert len(report.blocks) == 1 and report.blocks[0].router == "sigmoid after top-k", report
    assert report.blocks[0].experts.startswith("fused_experts")
    compiled = torch.compile(block, backend="moespec", options={"budget": 3, "inner": "eager", "score": "prob"})
    with torch.no_grad():
        s = torch.sigmoid(block.gate(x.view(-1, 48))).sum(0)
        keep = torch.zeros(8, dtype=torch.bool)
        keep[torch.sort(s, descending=True, stable=True).indices[:3]] = True
        _close(compiled(x), block(x, keep))
        assert not torch.allclose(block(x, keep), block(x))  # the budget binds in this case


def test_kernel_input_errors_are_value_errors():
    """Item 11: the Triton path raises on ids outside [-1, E) like the torch path; bf16 under the interpreter
    is refused rather than computed wrongly."""
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (make test sets it)")
    h, w = torch.randn(3, 16), torch.rand(3, 2)
    wgu, wd = torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    bad = torch.tensor([[0, 4], [1, 2], [3, -1]])
    for impl in ("torch", "triton"):
        with pytest.raises(ValueError, match="topk_ids"):
            torch.ops.moespec.fused_experts(h, bad, w, wgu, wd, "silu", None, None, False, 1.702, 7.0, impl)
    good = bad.clamp(max=3)
    with pytest.raises(ValueError, match="bf16"):
        torch.ops.moespec.fused_experts(h.bfloat16(), good, w.bfloat16(), wgu.bfloat16(), wd.bfloat16(), "silu",
                                        None, None, False, 1.702, 7.0, "triton")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_families_in_bf16_equal_eager_in_bf16(family):
    """bf16 on the CPU, compared with the eager model in the same dtype (GPT-OSS: test_gpt_oss_layout_in_16_bit)."""
    torch._dynamo.reset()
    model, _, _ = build(family, "grouped_mm", dtype=torch.bfloat16)
    x = _ids(12)
    compiled = torch.compile(model, backend="moespec", options={"inner": "eager"})
    with torch.no_grad():
        _close(compiled(x, use_cache=False).logits, model(x, use_cache=False).logits, torch.bfloat16)
    assert all(b.experts.startswith("fused_experts") for b in msc.explain(model, x).blocks)


class _FuzzMoE(nn.Module):
    """A random small MoE block: router kind, experts storage and sizes drawn from a seed."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
        self.e = pick([3, 5, 8, 11])
        self.k = pick([1, 2, 3])
        self.h, i = pick([8, 12, 20]), pick([6, 10])
        self.router = pick(["softmax", "softmax_after", "sigmoid_after"])
        self.store = pick(["stacked", "apart", "list"])
        self.gate = nn.Linear(self.h, self.e, bias=False)
        with torch.no_grad():
            self.gate.weight.mul_(6.0)
        if self.store == "list":
            self.experts = nn.ModuleList(nn.ModuleDict(dict(gate_proj=nn.Linear(self.h, i, bias=False),
                                                            up_proj=nn.Linear(self.h, i, bias=False),
                                                            down_proj=nn.Linear(i, self.h, bias=False)))
                                         for _ in range(self.e))
        elif self.store == "apart":
            self.w1, self.w3 = (nn.Parameter(torch.randn(self.e, i, self.h, generator=g) * 0.3) for _ in range(2))
            self.w2 = nn.Parameter(torch.randn(self.e, self.h, i, generator=g) * 0.3)
        else:
            self.gate_up_proj = nn.Parameter(torch.randn(self.e, 2 * i, self.h, generator=g) * 0.3)
            self.down_proj = nn.Parameter(torch.randn(self.e, self.h, i, generator=g) * 0.3)

    def route(self, x):
        logits = self.gate(x)
        if self.router == "softmax":
            w, ids = torch.topk(F.softmax(logits, dim=-1), self.k, dim=-1)
            return w / w.sum(-1, keepdim=True), ids
        v, ids = torch.topk(logits, self.k, dim=-1)
        return (F.softmax(v, dim=-1) if self.router == "softmax_after" else torch.sigmoid(v)), ids

    def forward(self, x):
        b, s, h = x.shape
        x = x.reshape(-1, h)
        w, ids = self.route(x)
        if self.store == "list":
            out = torch.zeros_like(x)
            for e, ex in enumerate(self.experts):
                w_e = (w * (ids == e)).sum(-1, keepdim=True)
                out = out + w_e * ex["down_proj"](F.silu(ex["gate_proj"](x)) * ex["up_proj"](x))
            return out.view(b, s, h)
        if self.store == "apart":
            g_, u_, d_ = self.w1[ids], self.w3[ids], self.w2[ids]
        else:
            g_, u_ = self.gate_up_proj[ids].chunk(2, dim=2)
            d_ = self.down_proj[ids]
        a = F.silu(torch.einsum("th,tkih->tki", x, g_)) * torch.einsum("th,tkih->tki", x, u_)
        return torch.einsum("tkh,tk->th", torch.einsum("tki,tkhi->tkh", a, d_), w).view(b, s, h)


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_small_moe_blocks(seed):
    """Random blocks: never a wrong output (no budget, C >= E), never more than C experts, every block explained."""
    torch._dynamo.reset()
    block = _FuzzMoE(seed).eval()
    dtype = torch.bfloat16 if seed % 3 == 2 else torch.float32
    block = block.to(dtype)
    x = torch.randn(1 + seed % 2, 7, block.h, generator=torch.Generator().manual_seed(seed)).to(dtype)
    report = msc.explain(block, x)
    assert len(report.blocks) == 1 and report.blocks[0].num_experts == block.e, report
    assert report.blocks[0].rewritten or report.blocks[0].reason, report
    policy = "truncate" if seed % 2 else "substitute"
    compiled = torch.compile(block, backend="moespec", options={"inner": "eager", "policy": policy})
    with torch.no_grad():
        want = block(x)
        _close(compiled(x), want, dtype)
        with msc.budget(block.e + 1):
            _close(compiled(x), want, dtype)
        c = min(block.k + 1, block.e)
        with msc.budget(c), msc.record_experts() as rec:
            assert torch.isfinite(compiled(x)).all()
    assert rec.events and all(len(ev.experts) <= c for ev in rec.events)
