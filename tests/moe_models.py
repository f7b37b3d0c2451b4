"""Tiny MoE models for the tests: transformers families built from configs, and plain PyTorch MoE
modules (gpt-fast style with gathered expert weights; a ModuleList of per-expert Linears).

Random routers are nearly uniform; `build` scales router weights up so budgets bind as in trained models.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, tie_word_embeddings=False)

FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=40, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=24, num_experts=12,
                                          num_experts_per_tok=4, shared_expert_intermediate_size=32,
                                          decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=24, num_experts=16,
                                          num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
                                          norm_topk_prob=True, head_dim=12)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=16,
                                              num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                              n_shared_experts=1, first_k_dense_replace=0, norm_topk_prob=True,
                                              q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                              qk_nope_head_dim=8, v_head_dim=12, num_key_value_heads=4)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=12,
                                      layer_types=["sliding_attention", "full_attention"], sliding_window=16)),
}
IMPLS = ("grouped_mm", "batched_mm", "eager")


def sharpen(model: nn.Module, scale: float = 8.0, seed: int = 0) -> None:
    """Scale router weights up (random routers are nearly uniform; trained ones are not) and give biases and
    score corrections random values, so budgets bind and bias paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 2)
            if len(leaf) >= 2 and leaf[-2] in ("gate", "router") and p.dim() == 2:
                p.mul_(scale)
            if name.endswith("gate_up_proj_bias") or name.endswith("down_proj_bias") or name.endswith("router.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def build(family: str, impl: str = "grouped_mm", seed: int = 0, scale: float = 8.0, dtype=torch.float32):
    """(model in eval mode, num_experts, top_k)."""
    torch.manual_seed(seed)
    if family in PLAIN:
        model = PLAIN[family]()
    else:
        cls_name, extra = FAMILIES[family]
        cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
        cfg._experts_implementation = impl
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    sharpen(model, scale, seed)
    model = model.to(dtype).eval()
    e, k = experts_of(model)
    return model, e, k


def tiny_draft() -> nn.Module:
    """A 1-layer dense Qwen3 sharing the families' vocabulary: the draft model of the decoder tests."""
    torch.manual_seed(1)
    cfg = transformers.Qwen3Config(**{**COMMON, "num_hidden_layers": 1}, intermediate_size=64, head_dim=12)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def experts_of(model) -> tuple[int, int]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_experts_per_tok"):
        return model.num_experts, model.top_k
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(cfg, name, None):
            return getattr(cfg, name), cfg.num_experts_per_tok
    raise ValueError("no expert count in config")


# --- plain PyTorch MoE modules --------------------------------------------------------------------

class GptFastMoE(nn.Module):
    """gpt-fast mixtral-moe style: gate linear, softmax, top-k, gathered expert weights, einsum combine."""

    def __init__(self, dim=48, inter=32, num_experts=8, top_k=2):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, inter, dim) * dim ** -0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, inter) * inter ** -0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, inter, dim) * dim ** -0.5)
        self.top_k = top_k

    def route(self, x):  # x [T, H] -> weights [T, k], ids [T, k]
        scores = F.softmax(self.gate(x), dim=-1)
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x):
        b, s, h = x.shape
        x = x.view(-1, h)
        weights, ids = self.route(x)
        w1, w3, w2 = self.w1[ids], self.w3[ids], self.w2[ids]  # [T, k, I, H], [T, k, I, H], [T, k, H, I]
        x1 = F.silu(torch.einsum("ti,taoi->tao", x, w1))
        x3 = torch.einsum("ti,taoi->tao", x, w3)
        outs = torch.einsum("tao,taio->tai", x1 * x3, w2)  # [T, k, H]
        return torch.einsum("tai,ta->ti", outs, weights).view(b, s, h)


class Expert(nn.Module):
    def __init__(self, dim, inter):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ModuleListMoE(nn.Module):
    """Per-expert nn.Linear modules in a ModuleList, combined densely (graph-capturable, no data-dependent loop)."""

    def __init__(self, dim=48, inter=32, num_experts=8, top_k=2):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(dim, inter) for _ in range(num_experts))
        self.top_k = top_k

    route = GptFastMoE.route

    def forward(self, x):
        b, s, h = x.shape
        x = x.view(-1, h)
        weights, ids = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            w_e = (weights * (ids == e)).sum(dim=-1, keepdim=True)  # [T, 1]
            out = out + w_e * expert(x)
        return out.view(b, s, h)


class TinyLM(nn.Module):
    """Embedding -> (norm -> MoE + residual) x 2 -> head: a causal-LM-shaped wrapper for plain MoE modules."""

    def __init__(self, moe_cls, num_experts=8, top_k=2, dim=48):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.moes = nn.ModuleList(moe_cls(dim=dim, num_experts=num_experts, top_k=top_k) for _ in range(2))
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, input_ids, **_):
        x = self.embed(input_ids)
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x))
        return _Out(self.head(x))


class _Out:
    def __init__(self, logits):
        self.logits = logits


PLAIN = {
    "gpt_fast": lambda: TinyLM(GptFastMoE),
    "module_list": lambda: TinyLM(ModuleListMoE),
}
ALL_CASES = [(f, i) for f in FAMILIES for i in IMPLS] + [(f, "plain") for f in PLAIN]
