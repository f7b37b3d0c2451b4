"""Use moespec's fused experts from another inference engine: the op takes the routing result as data.

engine's own router (top-k ids and weights) -> torch.ops.moespec.fused_experts -> [T, H]
(Triton grouped-GEMM kernels on CUDA, torch elsewhere; it has a fake implementation, so it compiles)
"""

import torch
import torch.nn.functional as F

import moe_spec_compile  # noqa: F401  (registers the moespec:: ops)

T, E, k, H, I = 6, 8, 2, 32, 24  # noqa: E741  tokens, experts, top-k, hidden, expert intermediate size
torch.manual_seed(0)
hidden = torch.randn(T, H)
w_gate_up = torch.randn(E, 2 * I, H) * H**-0.5  # rows [0, I): gate, rows [I, 2I): up (transformers' layout)
w_down = torch.randn(E, H, I) * I**-0.5
weights, ids = torch.topk(torch.softmax(torch.randn(T, E), dim=-1), k, dim=-1)  # the engine's router: [T, k]
ids[0, 1], weights[0, 1] = -1, 0.0  # -1 marks an empty slot: no expert loaded for it (e.g. cut by a budget)

out = torch.ops.moespec.fused_experts(hidden, ids, weights, w_gate_up, w_down, activation="silu")  # [T, H]


def per_token(t):  # the definition, one token at a time
    total = torch.zeros(H)
    for e, w in zip(ids[t].tolist(), weights[t].tolist()):
        if e >= 0:
            gate, up = w_gate_up[e, :I] @ hidden[t], w_gate_up[e, I:] @ hidden[t]
            total += w * (w_down[e] @ (F.silu(gate) * up))
    return total


print("max |op - per-token loop| =", (out - torch.stack([per_token(t) for t in range(T)])).abs().max().item())
compiled = torch.compile(torch.ops.moespec.fused_experts, fullgraph=True)  # an engine's compiled graph
print("compiled equal:", torch.allclose(compiled(hidden, ids, weights, w_gate_up, w_down), out, atol=1e-5))
