"""The experts ops: moespec::fused_experts (stacked weights) and moespec::fused_experts_list (per-expert
weights, e.g. a ModuleList of nn.Linear), with torch and Triton implementations and exact gradients.

(token, slot) pairs -> group by expert -> gate/up GEMM + act -> down GEMM x routing weight -> sum over slots

Legend: T tokens, E experts, k top-k, H hidden, I intermediate.

Both read the model's own parameters on every call: nothing is copied at compile time, so weights
changed after compiling (load_state_dict, an optimizer step) are always the ones used.
"""

from __future__ import annotations

import time

import torch

from .checks import ACTIVATIONS, check_expert_lists, check_fused_experts_args, check_ids_in_range

__all__ = ["fused_experts", "fused_experts_list", "fused_experts_torch", "ACTIVATIONS"]


def _up(t: torch.Tensor) -> torch.Tensor:
    """Math precision: 16-bit tensors compute in fp32; fp32 and fp64 keep their own."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _gate_act(gate_up: torch.Tensor, activation: str, interleaved: bool, alpha: float, limit: float) -> torch.Tensor:
    """gate_up [n, 2I] fp32 -> [n, I]: act(gate) * up, or GPT-OSS's clamped SwiGLU."""
    if interleaved:
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    if activation == "gelu":
        return torch.nn.functional.gelu(gate) * up
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(gate, approximate="tanh") * up
    if activation == "relu":
        return torch.relu(gate) * up
    if activation == "swiglu_clamp":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _grouped(hidden, topk_ids, topk_weights, num_experts, gate_up_fn, down_fn, activation, interleaved=False,
             alpha=1.702, limit=7.0) -> torch.Tensor:
    """Group (token, slot) pairs by expert and run each used expert's two GEMMs on its rows only, the activation once
    over all rows between them (two small ops per used expert, as transformers' grouped_mm fallback): gate_up_fn(e,
    x [n, H] fp32) -> [n, 2I] and down_fn(e, a [n, I]) -> [n, H] fp32 (biases, where any, inside them).
    Against the earlier loop (bias, activation and both GEMMs per expert), side by side on the 2-core CPU, six layers'
    weights in turn, N = 1-64 tokens exact and with ids inside 16 or 8 experts: 3 MB experts 0.93-1.04x its time,
    98 KB experts 0.81-0.94x (two runs; benchmarks/results/experts_cpu.md)."""
    t, h = hidden.shape
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1).long()  # [T*k]
    used = flat_ids >= 0
    order = torch.argsort(torch.where(used, flat_ids, num_experts), stable=True)  # by expert, empty slots last
    counts = torch.bincount(flat_ids[used], minlength=num_experts).tolist()
    order = order[: sum(counts)]  # [P] the used (token, slot) pairs by expert
    x32 = _up(hidden)[order // k]  # [P, H]
    spans, at = [], 0
    for expert, n in enumerate(counts):
        if n:
            spans.append((expert, at, at + n))
            at += n
    slot_out = torch.zeros(t * k, h, dtype=x32.dtype, device=hidden.device)  # [T*k, H]; empty slots stay 0
    if spans:
        gate_up = torch.cat([gate_up_fn(e, x32[a:b]) for e, a, b in spans])  # [P, 2I]
        act = _gate_act(gate_up, activation, interleaved, alpha, limit)  # [P, I]
        y = torch.cat([down_fn(e, act[a:b]) for e, a, b in spans])  # [P, H]
        slot_out.index_copy_(0, order, y * _up(topk_weights.reshape(-1))[order, None])
    return slot_out.view(t, k, h).sum(1).to(hidden.dtype)


def _mm_t(x: torch.Tensor, w: torch.Tensor, onednn: bool | None = None) -> torch.Tensor:
    """x [n, in] @ w [out, in].T. onednn None: fp32 weights of 256 KB and more on the CPU through oneDNN's linear,
    which ran the few rows an expert gets in a pass faster than MKL's GEMM and uses both cores for one row (smaller
    weights: its fixed cost, ~8 us a call, outweighs that); True / False: oneDNN where it applies / MKL (the loop's
    measured choice, LOOP_GEMM). Measured on the 2-core CPU on 2026-12-05, weights cold, x @ w.T against oneDNN,
    per 3 MB expert (gate_up [512, 1024] + down [1024, 256]), 2 threads: n = 1 240 / 153 us, 8 353 / 243, 16
    419 / 296, 32 546 / 406; 1 thread: n = 1 238 / 228, 8 453 / 398, 32 805 / 728; per [256, 256] weight: n = 1
    33 / 31, per [128, 128]: 12.7 / 21.4. On 2026-12-06, the same VM: n = 1 65 / 99, 4 86 / 138, 16 252 / 208."""
    if (_ONEDNN and onednn is not False and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and w.numel() * 4 >= ONEDNN_WEIGHT_BYTES):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, None, "none", [], "")
    return x @ w.t()


class _FasterGemm:
    """Which GEMM the loop over large experts runs (_mm_t's onednn=True or False), measured in this process per key
    (the experts' shapes, the power-of-two bucket of rows per used expert, the thread count): the first ROUNDS calls
    of each choice alternate and are timed (whole calls: every used expert's weights as cold as in use), then the
    choice with the lower best time is kept. MKL and oneDNN trade places by machine and by day: on the same 2-core VM
    oneDNN took 0.6x MKL's time per 3 MB expert at one row on 2026-12-05 and 1.5x on 2026-12-06."""

    ROUNDS = 3

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.times: dict[tuple, dict[bool, list[float]]] = {}
        self.kept: dict[tuple, bool] = {}

    def run(self, key: tuple, fn):
        """fn(onednn) for `key`'s kept choice, or while measuring the choice that has run less."""
        kept = self.kept.get(key)
        if kept is not None:
            return fn(kept)
        times = self.times.setdefault(key, {True: [], False: []})
        onednn = len(times[True]) <= len(times[False])
        t0 = self.clock()
        out = fn(onednn)
        times[onednn].append(self.clock() - t0)
        if all(len(t) >= self.ROUNDS for t in times.values()):
            self.kept[key] = min(times, key=lambda c: min(times[c]))
        return out


LOOP_GEMM = _FasterGemm()


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_WEIGHT_BYTES = 256 * 1024


def _grouped_gemm(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down, interleaved,
                  alpha, limit, w_up) -> torch.Tensor:
    """fp32 weights: pairs sorted by expert, torch's grouped GEMM over the experts' weights in place (no copies, no
    Python loop over experts; an expert without pairs is an empty group). Same math as the loop in _grouped."""
    t, h = hidden.shape
    k = topk_ids.shape[1]
    e = w_gate_up.shape[0]
    ids = topk_ids.reshape(-1).long()  # [P]
    used = ids >= 0
    order = torch.argsort(torch.where(used, ids, e), stable=True)  # by expert, empty slots last
    n = int(used.sum())
    order = order[:n]
    offs = torch.bincount(ids[used], minlength=e).cumsum(0).to(torch.int32)  # [E] group ends
    sid = ids[order]
    x = hidden[order // k]  # [n, H]
    gate_up = torch._grouped_mm(x, w_gate_up.transpose(1, 2), offs=offs)  # [n, 2I] (gate rows only with w_up)
    if w_up is not None:
        gate_up = torch.cat([gate_up, torch._grouped_mm(x, w_up.transpose(1, 2), offs=offs)], dim=-1)
    if b_gate_up is not None:
        gate_up = gate_up + b_gate_up[sid].float()
    y = torch._grouped_mm(_gate_act(gate_up, activation, interleaved, alpha, limit), w_down.transpose(1, 2),
                          offs=offs)  # [n, H]
    if b_down is not None:
        y = y + b_down[sid].float()
    out = torch.zeros(t * k, h, dtype=torch.float32, device=hidden.device)
    out.index_copy_(0, order, y * topk_weights.reshape(-1)[order, None].float())
    return out.view(t, k, h).sum(1).to(hidden.dtype)


def _per_slot(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down, interleaved, alpha,
              limit, w_up) -> torch.Tensor:
    """Small passes of small experts (_per_slot_pays): gather each slot's expert weights and batch the GEMMs as
    T*k matrix-vector products: no loop over experts, no host read, a few ops whatever E is. Copies T*k experts'
    weights (a used expert once per slot), so larger passes and larger experts group by expert instead. Empty
    slots (-1) add exactly 0."""
    t, h = hidden.shape
    k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1).long()  # [P]
    used = ids >= 0
    sid = ids.clamp(min=0)
    x = _up(hidden).repeat_interleave(k, dim=0)

    def vec_mat(v, w):  # v [P, n] times each slot's gathered w [P, m, n] transposed -> [P, m]
        # a row vector times a transposed matrix: torch's CPU bmm runs this orientation 8x faster than the
        # matrix times a column vector (30 against 264 us on [30, 64, 256], 2 cores)
        return torch.bmm(v[:, None, :], _up(w.index_select(0, sid)).transpose(1, 2))[:, 0]

    gate_up = vec_mat(x, w_gate_up)  # [P, 2I] (gate rows only with w_up)
    if w_up is not None:
        gate_up = torch.cat([gate_up, vec_mat(x, w_up)], dim=-1)
    if b_gate_up is not None:
        gate_up = gate_up + _up(b_gate_up.index_select(0, sid))
    a = _gate_act(gate_up, activation, interleaved, alpha, limit)  # [P, I]
    y = vec_mat(a, w_down)  # [P, H]
    if b_down is not None:
        y = y + _up(b_down.index_select(0, sid))
    y = torch.where(used[:, None], y * _up(topk_weights.reshape(-1, 1)), 0.0)
    return y.view(t, k, h).sum(1).to(hidden.dtype)


def _per_expert(hidden, used_ids, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down,
                interleaved, alpha, limit, w_up) -> torch.Tensor:
    """Small passes routed to few experts (a budgeted pass: every slot inside the budget set A): gather each used
    expert's weights once (used_ids [U], sorted) and run every token through all U of them as dense batched GEMMs,
    each token's output the sum over its own slots' experts weighted by its routing weights (the others weigh 0).
    Reads U experts where _per_slot copies one per slot: U = 16 experts against 102 slots, the bundled target's
    17-token pass at C = 16, 0.46-0.54x _per_slot's time in two measurements (benchmarks/results/experts_cpu.md)."""
    t, h = hidden.shape
    u = used_ids.shape[0]
    ids = topk_ids.long()
    col = torch.searchsorted(used_ids, ids.clamp(min=0))  # [T, k] each slot's expert's row among the used
    w = torch.where(ids >= 0, _up(topk_weights), 0.0)  # empty slots add exactly 0
    coef = torch.zeros(t, u, dtype=w.dtype, device=hidden.device).scatter_add_(1, col, w)  # [T, U]
    x = _up(hidden).expand(u, t, h)

    def mat(v, weights):  # v [U, T, in] times each used expert's w [U, out, in] transposed -> [U, T, out]
        return torch.bmm(v, _up(weights.index_select(0, used_ids)).transpose(1, 2))

    gate_up = mat(x, w_gate_up)  # [U, T, 2I] (gate rows only with w_up)
    if w_up is not None:
        gate_up = torch.cat([gate_up, mat(x, w_up)], dim=-1)
    if b_gate_up is not None:
        gate_up = gate_up + _up(b_gate_up.index_select(0, used_ids))[:, None, :]
    a = _gate_act(gate_up.reshape(u * t, -1), activation, interleaved, alpha, limit).view(u, t, -1)  # [U, T, I]
    y = mat(a, w_down)  # [U, T, H]
    if b_down is not None:
        y = y + _up(b_down.index_select(0, used_ids))[:, None, :]
    return torch.einsum("tu,uth->th", coef, y).to(hidden.dtype)


def _used_experts(topk_ids, num_experts: int) -> torch.Tensor | None:
    """The experts a small CPU pass uses (sorted) when _per_expert pays for it, else None: at most half as many as
    the pass's slots (each gathered once instead of once per slot) and at most 4k (each token runs through all of
    them). Measured on the bundled target's layer (E = 64, k = 6, 96 KB experts; 2-core CPU) against _per_slot: 17
    tokens in 16 experts 0.46-0.54x its time, in 8 0.35x, 6 tokens in 16 0.65-0.71x; exact passes (6 tokens in ~29
    experts, 17 in ~51) and one token gain nothing and stay per slot (benchmarks/results/experts_cpu.md)."""
    t, k = topk_ids.shape
    if not PER_EXPERT or topk_ids.device.type != "cpu" or t < 2:  # one token: its k slots are k experts
        return None
    used = torch.bincount(topk_ids.reshape(-1).long() + 1, minlength=num_experts + 1)[1:] > 0  # ids >= -1 (checked)
    u = int(used.sum())
    return used.nonzero()[:, 0] if 0 < u and 2 * u <= t * k and u <= 4 * k else None


def _grouped_gemm_ok(hidden, w_gate_up, w_down, w_up) -> bool:
    """CPU, fp32 throughout (16-bit weights would be upcast whole: the loop upcasts only the used experts), small
    experts (_expert_bytes < LOOP_EXPERT_BYTES), and operands torch's grouped GEMM accepts: 16-byte aligned storage
    and strides (H and I multiples of 4), which odd sizes and some weight views are not."""
    ts = [hidden, w_gate_up, w_down] + ([w_up] if w_up is not None else [])
    return (GROUPED_GEMM and hasattr(torch, "_grouped_mm")
            and _expert_bytes(w_gate_up, w_down, w_up) < LOOP_EXPERT_BYTES
            and hidden.shape[-1] % 4 == 0
            and w_down.shape[-1] % 4 == 0
            and all(x.device.type == "cpu" and x.dtype == torch.float32 and _aligned16(x) for x in ts))


def _aligned16(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0
                                          for s, d in zip(t.stride(), t.shape) if s != 1 and d > 1)


GROUPED_GEMM = True  # use torch's grouped GEMM where _grouped_gemm_ok (tests switch it off to compare with the loop)
PER_SLOT = True  # small passes gather per-slot weights (_per_slot); tests switch it off to compare
PER_EXPERT = True  # small CPU passes in few experts gather each used expert once (_per_expert); likewise
# Per slot, a pass copies P experts' weights (a used expert once per slot); grouped by expert it reads each used
# expert in place but pays a fixed cost per expert, used or not (a few us per group in torch's CPU grouped GEMM).
# Measured side by side (calls alternating, medians of 40, 2-core CPU, 32 MB L3), per slot against grouped, by
# slots P and expert size: 96 KB experts (the bundled target, E = 64): P = 6 0.39x, 24 0.49x, 96 0.58x, 144 0.66x,
# 192 0.91x, 288 1.43x; 24 KB: 0.35-0.54x up to P = 288; 192 KB (E = 128): P = 64 0.81x, 128 1.22x; 384 KB (E = 64):
# P = 32 0.79x, 64 1.22x; 384 KB (E = 16): P = 16 0.88x, 32 1.07x. Gathering pays while P <= 2E and the gathered
# weights stay within PER_SLOT_GATHER_BYTES (about half this machine's L3); experts of LOOP_EXPERT_BYTES and more
# never gather (each slot would copy MBs).
PER_SLOT_GATHER_BYTES = 16 * 1024 * 1024


# Large experts loop over the used ones (_grouped, each GEMM through _mm_t) instead of torch's grouped GEMM, which
# pays a call per expert, used or not, and runs MKL's GEMM. Measured side by side on the 2-core CPU (calls
# alternating, medians, two layers' weights in turn), 3 MB experts (hidden 1024, I 256), the loop against the
# grouped GEMM, 2 threads: N = 1 0.68-0.72x, N = 4 0.63-0.74x, N = 16 exact 0.69x, C = 16 0.83x, C = 8 0.80x,
# N = 64 0.82-0.91x; 1 thread 0.91-1.07x. 98 KB experts (the bundled target) stay grouped: the loop costs 1.2-3x
# there (a few us of Python per used expert).
LOOP_EXPERT_BYTES = 512 * 1024


def _expert_bytes(w_gate_up, w_down, w_up) -> int:
    return (w_gate_up[0].numel() + w_down[0].numel() + (w_up[0].numel() if w_up is not None else 0)) \
        * w_gate_up.element_size()


def _per_slot_pays(topk_ids, w_gate_up, w_down, w_up) -> bool:
    e, p, size = w_gate_up.shape[0], topk_ids.numel(), _expert_bytes(w_gate_up, w_down, w_up)
    return p <= 2 * e and p * size <= PER_SLOT_GATHER_BYTES and size < LOOP_EXPERT_BYTES


def fused_experts_torch(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu", b_gate_up=None,
                        b_down=None, interleaved=False, alpha=1.702, limit=7.0, w_up=None) -> torch.Tensor:
    """The reference implementation: touch only the experts that received tokens, fp32 math, deterministic
    combine over the k slots. w_up given: w_gate_up holds the gate rows [E, I, H] and w_up the up rows.
    Small passes of small experts: batched matrix-vector products over gathered weights (_per_slot); fp32 on the
    CPU: torch's grouped GEMM instead of a Python loop over experts (_grouped_gemm). Small CPU passes routed to few
    experts (budgeted ones) gather each used expert once (_per_expert)."""
    check_ids_in_range(topk_ids, w_gate_up.shape[0])
    if PER_SLOT and _per_slot_pays(topk_ids, w_gate_up, w_down, w_up):
        used = _used_experts(topk_ids, w_gate_up.shape[0])
        if used is not None:
            return _per_expert(hidden, used, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down,
                               interleaved, alpha, limit, w_up)
        return _per_slot(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down, interleaved,
                         alpha, limit, w_up)
    if _grouped_gemm_ok(hidden, w_gate_up, w_down, w_up) and not torch.is_grad_enabled():
        return _grouped_gemm(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down,
                             interleaved, alpha, limit, w_up)

    def loop(onednn):
        def gate_up_fn(e, x):  # x [n, H] fp32
            gate_up = _mm_t(x, _up(w_gate_up[e]), onednn)  # [n, 2I] (gate rows only with w_up)
            if w_up is not None:
                gate_up = torch.cat([gate_up, _mm_t(x, _up(w_up[e]), onednn)], dim=-1)
            return gate_up + _up(b_gate_up[e]) if b_gate_up is not None else gate_up

        def down_fn(e, a):  # a [n, I] fp32
            y = _mm_t(a, _up(w_down[e]), onednn)  # [n, H]
            return y + _up(b_down[e]) if b_down is not None else y

        return _grouped(hidden, topk_ids, topk_weights, w_gate_up.shape[0], gate_up_fn, down_fn, activation,
                        interleaved, alpha, limit)

    weights = [w for w in (w_gate_up, w_down, w_up) if w is not None]
    if not (_ONEDNN and hidden.device.type == "cpu" and all(
            w.dtype == torch.float32 and w[0].numel() * 4 >= ONEDNN_WEIGHT_BYTES for w in weights)):
        return loop(None)  # oneDNN does not apply here: MKL, nothing to measure
    ids = topk_ids[topk_ids >= 0]
    rows = -(-ids.numel() // max(int(torch.unique(ids).numel()), 1))  # rows per used expert, what the GEMMs see
    key = (*(tuple(w.shape[1:]) for w in weights), 1 << (rows - 1).bit_length(), torch.get_num_threads())
    return LOOP_GEMM.run(key, loop)


def _list_torch(hidden, topk_ids, topk_weights, gate, up, down, activation, alpha, limit) -> torch.Tensor:
    check_ids_in_range(topk_ids, len(gate))

    return _grouped(hidden, topk_ids, topk_weights, len(gate),
                    lambda e, x: torch.cat([_mm_t(x, _up(gate[e])), _mm_t(x, _up(up[e]))], dim=-1),
                    lambda e, a: _mm_t(a, _up(down[e])), activation, False, alpha, limit)


def _use_triton(impl: str, hidden: torch.Tensor) -> bool:
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "triton" or (impl == "auto" and hidden.is_cuda and _triton_launcher() is not None):
        if _triton_launcher() is None:
            raise RuntimeError("impl='triton' but the Triton kernels are not importable here")
        return True
    return False


@torch.library.custom_op("moespec::fused_experts", mutates_args=())
def fused_experts(
    hidden: torch.Tensor,  # [T, H]
    topk_ids: torch.Tensor,  # [T, k], -1 = empty slot
    topk_weights: torch.Tensor,  # [T, k]
    w_gate_up: torch.Tensor,  # [E, 2I, H] ([E, I, H] gate rows only when w_up is given)
    w_down: torch.Tensor,  # [E, H, I]
    activation: str = "silu",
    b_gate_up: torch.Tensor | None = None,  # [E, 2I]
    b_down: torch.Tensor | None = None,  # [E, H]
    interleaved: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    impl: str = "auto",
    w_up: torch.Tensor | None = None,  # [E, I, H]: up rows kept apart from the gate rows (gpt-fast w1/w3)
) -> torch.Tensor:
    """out[t] = sum_j w[t,j] * w_down[e] @ act(gate[e] @ x_t) * (up[e] @ x_t), e = topk_ids[t,j] (-1: empty).

    impl: "auto" (Triton kernels on CUDA, torch elsewhere), "torch", or "triton" (also on the CPU
    under TRITON_INTERPRET=1)."""
    args = (hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down)
    check_fused_experts_args(*args, w_up=w_up)
    if _use_triton(impl, hidden):
        wgu = w_gate_up if w_up is None else torch.cat([w_gate_up, w_up], dim=1)  # per call: never stale
        return _triton_launcher()(hidden, topk_ids, topk_weights, wgu, w_down, activation, b_gate_up, b_down,
                                  interleaved, alpha, limit)
    return fused_experts_torch(*args, interleaved, alpha, limit, w_up)


def experts_in_graph(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu", b_gate_up=None,
                     b_down=None, interleaved=False, alpha=1.702, limit=7.0, impl="auto", w_up=None):
    """fused_experts inside a graph inductor compiles (passes/lower.py), where in_graph_pays: _per_slot's plain tensor
    code, which inductor fuses (the gathers into the products)."""
    return _per_slot(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down, interleaved,
                     alpha, limit, w_up)


def in_graph_pays(hidden, topk_ids, w_gate_up, w_down, w_up, impl="auto") -> bool:
    """Fake values of fused_experts' operands -> may it run as experts_in_graph? Small CPU passes of small experts
    (_per_slot_pays) with static shapes (the choice is made while tracing). The bundled target's 17-token pass, 6
    layers, 2-core CPU: the whole budgeted pass 3.1 ms this way against 4.8 ms through the op."""
    sizes = (*hidden.shape, *topk_ids.shape, *w_gate_up.shape, *w_down.shape)
    return (hidden.device.type == "cpu" and impl != "triton" and PER_SLOT and all(isinstance(d, int) for d in sizes)
            and _per_slot_pays(topk_ids, w_gate_up, w_down, w_up))


@fused_experts.register_fake
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu", b_gate_up=None, b_down=None,
      interleaved=False, alpha=1.702, limit=7.0, impl="auto", w_up=None):
    return torch.empty_like(hidden)


@torch.library.custom_op("moespec::fused_experts_list", mutates_args=())
def fused_experts_list(
    hidden: torch.Tensor,  # [T, H]
    topk_ids: torch.Tensor,  # [T, k], -1 = empty slot
    topk_weights: torch.Tensor,  # [T, k]
    gate: list[torch.Tensor],  # E x [I, H] (nn.Linear weights)
    up: list[torch.Tensor],  # E x [I, H]
    down: list[torch.Tensor],  # E x [H, I]
    activation: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    impl: str = "auto",
) -> torch.Tensor:
    """fused_experts over per-expert weight lists (a ModuleList of experts). The torch path reads only the
    used experts' own tensors; the Triton path stacks the lists per call (it reads every expert's weights:
    store the experts stacked to keep a budget's savings on a GPU)."""
    check_expert_lists(gate, up, down, hidden)
    if _use_triton(impl, hidden):
        wgu = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)  # [E, 2I, H]
        return _triton_launcher()(hidden, topk_ids, topk_weights, wgu, torch.stack(down), activation, None, None,
                                  False, alpha, limit)
    check_fused_experts_args(hidden, topk_ids, topk_weights, gate[0][None], down[0][None], activation, None, None,
                             w_up=up[0][None])
    return _list_torch(hidden, topk_ids, topk_weights, gate, up, down, activation, alpha, limit)


@fused_experts_list.register_fake
def _(hidden, topk_ids, topk_weights, gate, up, down, activation="silu", alpha=1.702, limit=7.0, impl="auto"):
    return torch.empty_like(hidden)


# --- exact gradients: a dense recompute under autograd ------------------------------------------------
# The backward must trace under fake tensors (aot_autograd traces it at compile time whenever a parameter
# requires grad), so it runs every expert on every token and weighs by the routing: no data-dependent shapes.

def _dense(hidden, ids, weights, w_gate_up, w_down, activation, b_gate_up, b_down, interleaved, alpha, limit, w_up):
    """The forward as dense math over all experts: [E, T, ...] intermediates, exact, traceable."""
    e = w_gate_up.shape[0]
    x = _up(hidden)  # [T, H]
    gate_up = torch.einsum("th,eoh->eto", x, _up(w_gate_up))  # [E, T, 2I] (or [E, T, I] gate only)
    if w_up is not None:
        gate_up = torch.cat([gate_up, torch.einsum("th,eoh->eto", x, _up(w_up))], dim=-1)
    if b_gate_up is not None:
        gate_up = gate_up + _up(b_gate_up)[:, None, :]
    n, t, two_i = gate_up.shape
    a = _gate_act(gate_up.reshape(n * t, two_i), activation, interleaved, alpha, limit).reshape(n, t, -1)
    y = torch.einsum("eti,ehi->eth", a, _up(w_down))  # [E, T, H]
    if b_down is not None:
        y = y + _up(b_down)[:, None, :]
    onehot = ids.long()[None, :, :] == torch.arange(e, device=ids.device)[:, None, None]  # [E, T, k]; -1 never
    coef = (onehot * _up(weights)[None]).sum(-1)  # [E, T]
    return torch.einsum("et,eth->th", coef, y).to(hidden.dtype)


def _needs(x) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _grads(out, inputs, grad_out):
    wanted = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else iter(())
    return [next(got) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs]


def _setup_fused(ctx, inputs, output):
    (hidden, ids, weights, wgu, wdn, act, bgu, bdn, inter, alpha, limit, _impl, w_up) = inputs
    ctx.consts = (act, inter, alpha, limit)
    ctx.needs = [_needs(x) for x in (hidden, weights, wgu, wdn, bgu, bdn, w_up)]
    ctx.save_for_backward(hidden, ids, weights, wgu, wdn, bgu, bdn, w_up)


def _backward_fused(ctx, grad):
    hidden, ids, weights, wgu, wdn, bgu, bdn, w_up = ctx.saved_tensors
    act, inter, alpha, limit = ctx.consts
    xs = [hidden, weights, wgu, wdn, bgu, bdn, w_up]
    xs = [x.detach().requires_grad_(n) if x is not None else None for x, n in zip(xs, ctx.needs)]
    with torch.enable_grad():
        out = _dense(xs[0], ids, xs[1], xs[2], xs[3], act, xs[4], xs[5], inter, alpha, limit, xs[6])
        g = _grads(out, xs, grad)
    return g[0], None, g[1], g[2], g[3], None, g[4], g[5], None, None, None, None, g[6]


torch.library.register_autograd("moespec::fused_experts", _backward_fused, setup_context=_setup_fused)


def _setup_list(ctx, inputs, output):
    hidden, ids, weights, gate, up, down, act, alpha, limit = inputs[:9]
    ctx.consts = (act, alpha, limit, len(gate))
    ctx.needs = [_needs(x) for x in (hidden, weights, *gate, *up, *down)]
    ctx.save_for_backward(hidden, ids, weights, *gate, *up, *down)


def _backward_list(ctx, grad):
    hidden, ids, weights, *ws = ctx.saved_tensors
    act, alpha, limit, e = ctx.consts
    xs = [x.detach().requires_grad_(n) for x, n in zip([hidden, weights, *ws], ctx.needs)]
    with torch.enable_grad():
        gate, up, down = (torch.stack(xs[2 + j * e:2 + (j + 1) * e]) for j in range(3))
        out = _dense(xs[0], ids, xs[1], gate, down, act, None, None, False, alpha, limit, up)
        g = _grads(out, xs, grad)
    grads = (g[0], None, g[1], g[2:2 + e], g[2 + e:2 + 2 * e], g[2 + 2 * e:], None, None, None, None)
    return grads[:len(ctx.needs_input_grad)]  # as many as the call passed (list inputs: torch checks the structure)


torch.library.register_autograd("moespec::fused_experts_list", _backward_list, setup_context=_setup_list)


def _triton_launcher():
    """The Triton launcher (kernels/), or None where Triton or the kernels are unavailable."""
    try:
        from .kernels import fused_experts as launcher
    except ImportError:
        return None
    return launcher
