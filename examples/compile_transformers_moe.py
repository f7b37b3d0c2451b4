"""Compile a transformers MoE with an expert budget, see which experts each layer loaded, and explain it.

small Qwen3-MoE from a config -> torch.compile(backend="moespec", budget 4) -> record experts -> explain
"""

import torch
import transformers

import moe_spec_compile as msc

config = transformers.Qwen3MoeConfig(
    vocab_size=256, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4)
model = transformers.AutoModelForCausalLM.from_config(config).eval()  # random weights, nothing downloaded
verify_ids = torch.randint(0, 256, (1, 12))  # stands in for a verify pass: 12 drafted tokens

compiled = torch.compile(model, backend="moespec", options={"budget": 4, "policy": "substitute"})
with msc.record_experts() as rec:
    budgeted = compiled(verify_ids, use_cache=False).logits
for event in rec.events:  # each MoE layer loaded at most 4 of its 16 experts for the 12 tokens
    print(f"{event.block}: {event.num_tokens} tokens used experts {event.experts} (budget {event.budget})")

with msc.budget(None):  # the same compiled model without a budget: the unmodified model's output
    exact = compiled(verify_ids, use_cache=False).logits
print("max |exact - model| =", (exact - model(verify_ids, use_cache=False).logits).abs().max().item())
print("argmax equal to the exact pass's at", (budgeted.argmax(-1) == exact.argmax(-1)).float().mean().item())
print(msc.explain(model, verify_ids, use_cache=False))
