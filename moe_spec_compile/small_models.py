"""Small random models built from a transformers config class name, for `moespec explain/generate --config`,
and the random Qwen3-MoE target + dense draft pair that stands in for the bundled one (generate, benchmarks).

config class name -> small_config(name) (tiny sizes, attention shapes that agree) -> build_small(name)

The sizes follow the test suite's recipe (tests/moe_models.py): every covered family gets the extra
fields it needs (DeepSeek-V3's latent attention dims, GPT-OSS's layer types, ...); other config classes
get the common sizes only. Router weights are scaled up, as in trained models, so budgets bind.
Nothing is downloaded.
"""

from __future__ import annotations

import torch

__all__ = ["FAMILY_OVERRIDES", "small_config", "build_small", "config_models"]

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, tie_word_embeddings=False)

# Per config class: the fields that make a tiny model of that family consistent (from tests/moe_models.py).
FAMILY_OVERRIDES = {
    "MixtralConfig": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    "Qwen2MoeConfig": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                           shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[],
                           norm_topk_prob=False),
    "Qwen3MoeConfig": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                           decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, head_dim=16),
    "OlmoeConfig": dict(intermediate_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False),
    "DeepseekV3Config": dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=16,
                             num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                             n_shared_experts=1, first_k_dense_replace=0, norm_topk_prob=True, q_lora_rank=None,
                             kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                             num_key_value_heads=4),
    "GptOssConfig": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                         layer_types=["sliding_attention", "full_attention"], sliding_window=16),
}


def small_config(name: str, experts_implementation: str | None = None):
    """A tiny instance of the transformers config class `name` (e.g. "Qwen3MoeConfig")."""
    import transformers

    cfg = getattr(transformers, name)(**{**COMMON, **FAMILY_OVERRIDES.get(name, {})})
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    return cfg


def build_small(name: str, experts_implementation: str | None = None, seed: int = 0, router_scale: float = 8.0):
    """A random causal LM of config class `name` in eval mode, routers sharpened by `router_scale`."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(small_config(name, experts_implementation))
    return _sharpen_routers(model, router_scale).eval()


@torch.no_grad()
def _sharpen_routers(model, scale: float):
    """Scale every router weight (a 2-D `...gate.weight` or `...router.weight`) by `scale`: random routers
    are nearly uniform, trained ones are not."""
    for pname, p in model.named_parameters():
        parts = pname.rsplit(".", 2)
        if len(parts) >= 2 and parts[-2] in ("gate", "router") and p.dim() == 2:
            p.mul_(scale)
    return model


def config_models(vocab: int = 512, hidden: int = 128, layers: int = 4, experts: int = 32, top_k: int = 4,
                  draft_layers: int = 1, seed: int = 0):
    """(target, draft): a random Qwen3-MoE with sharpened routers (random ones are nearly uniform) and a
    random dense Qwen3 draft sharing its vocabulary. Nothing is downloaded."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=hidden // 4, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    target = _sharpen_routers(transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(
        **common, num_hidden_layers=layers, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True)), 8.0).eval()
    draft = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(
        **common, num_hidden_layers=draft_layers, intermediate_size=2 * hidden)).eval()
    return target, draft
