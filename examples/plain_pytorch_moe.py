"""A plain PyTorch MoE layer (gpt-fast style: softmax router, top-k, gathered expert weights) compiled with
the moespec backend's default inductor path: it finds the router and the experts by itself.

MoE module -> torch.compile(backend="moespec") -> budgeted routing + moespec::fused_experts -> inductor
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_spec_compile as msc


class MoE(nn.Module):
    def __init__(self, dim=64, inter=48, num_experts=8, top_k=2):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, inter, dim) * dim**-0.5)  # gate projections [E, I, H]
        self.w3 = nn.Parameter(torch.randn(num_experts, inter, dim) * dim**-0.5)  # up projections [E, I, H]
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, inter) * inter**-0.5)  # down projections [E, H, I]
        self.top_k = top_k

    def forward(self, x):  # x [T, H]
        weights, ids = torch.topk(F.softmax(self.gate(x), dim=-1), self.top_k, dim=-1)  # [T, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        w1, w3, w2 = self.w1[ids], self.w3[ids], self.w2[ids]  # [T, k, I, H], [T, k, I, H], [T, k, H, I]
        x1 = F.silu(torch.einsum("ti,taoi->tao", x, w1))
        x3 = torch.einsum("ti,taoi->tao", x, w3)
        outs = torch.einsum("tao,taio->tai", x1 * x3, w2)  # [T, k, H]
        return torch.einsum("tai,ta->ti", outs, weights)


class Model(nn.Module):  # two residual MoE layers; the backend names blocks by module path: layers.0, layers.1
    def __init__(self, dim=64):
        super().__init__()
        self.layers = nn.ModuleList([MoE(dim), MoE(dim)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


torch.manual_seed(0)
model = Model().eval()
x = torch.randn(10, 64)  # 10 tokens
compiled = torch.compile(model, backend="moespec")  # no budget: exact; inductor compiles the rest
print("max |compiled - eager| =", (compiled(x) - model(x)).abs().max().item())
with msc.budget(3), msc.record_experts() as rec:  # at most 3 of the 8 experts per layer for these tokens
    compiled(x)
print("experts used under budget 3:", {event.block: event.experts for event in rec.events})
print(msc.explain(model, x))
