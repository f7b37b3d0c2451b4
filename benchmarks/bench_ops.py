"""Microbenchmarks for a kernel tuner: the routing ops, the experts op and a whole verify pass at N tokens under
budget C, as pytest-benchmark tests, saved per run and compared across commits (`make bench-ops`). Never part of
`make test` (pytest's testpaths are tests/; this file's name matches no test pattern).

random hidden states [N, H] -> the sharpened router's probabilities [N, E] -> budget_topk + budget_apply (ids
inside the C experts of A) -> fused_experts on those ids (bytes of the used experts, GB/s) -> a whole verify
pass of N tokens: moespec (inner inductor) under msc.budget(C) beside inductor on the unmodified model, with the
bytes the pass must read over the bandwidth measured once: the floor

    make bench-ops                                               # saves under results/ops/, compares with the last
    make bench-ops BENCH_OPS_ARGS="-k 'N1- or N16-'"             # a subset (the whole run: see benchmarks/README.md)

The model is bench_peers' larger MoE (Qwen3-MoE, hidden 1024, 64 experts top-8, moe_intermediate 256), where
expert bytes dominate. Each case checks its output once, untimed, before timing: finite, and for C = None equal to
the plain reference (the model's own experts, the unmodified model through inductor) within fp32 tolerance.

Legend: N tokens of the pass, E experts, k top-k, H hidden, I expert intermediate, C budget (None: exact).
"""

from __future__ import annotations

import os

import pytest
import torch
from bench_peers import big_moe  # benchmarks/ is on sys.path: pytest's default (prepend) import mode

import moe_spec_compile as msc
from moe_spec_compile.backend import allow_recompiles
from moe_spec_compile.budget import DEFAULT_SCORE, register_spec
from moe_spec_compile.cost import ModelShape, measure_bandwidth
from moe_spec_compile.speculative.decoder import plain_compiled

LAYERS = 1  # one MoE layer: compiles stay short, expert bytes still dominate the pass
TOKENS = (1, 4, 16, 64)  # N, tokens of the pass
BUDGETS = (None, 8, 16)  # C of E = 64 experts; None: exact
CASES = [pytest.param(n, c, id=f"N{n}-{'exact' if c is None else f'C{c}'}") for n in TOKENS for c in BUDGETS]
ROUNDS = {"routing": 200, "experts": 20, "verify": 10}  # timed rounds per case, after 2 warm-up rounds
WARMUP = 2
THREADS = "BENCH_OPS_THREADS"  # CPU threads for the run (default: torch's); 1 keeps a shared machine's noise down


@pytest.fixture(scope="module", autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get(THREADS, before)))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


# --- shared set-up: one model, one compilation, the bandwidth: each once per run ----------------

@pytest.fixture(scope="module")
def model():
    return big_moe(LAYERS)


@pytest.fixture(scope="module")
def shape(model) -> ModelShape:
    return ModelShape.from_model(model)


@pytest.fixture(scope="module")
def bandwidth(threads) -> float:
    """Bytes per second of a streaming read on the CPU (cost.measure_bandwidth), measured once per run."""
    return measure_bandwidth("cpu")


@pytest.fixture(scope="module")
def compiled(model):
    allow_recompiles(4 * len(TOKENS))  # one graph per N for each compilation of the model's forward
    return torch.compile(model, backend="moespec", dynamic=False,
                         options={"inner": "inductor", "max_budget_tokens": None})


@pytest.fixture(scope="module")
def plain(compiled):
    """The unmodified model through inductor (dynamic=False), as the decoder's exact plain path builds it."""
    return plain_compiled(compiled)


def router_probs(model, n: int) -> torch.Tensor:
    """[N, E] softmax of the first MoE layer's router logits on random hidden states (big_moe sharpens its
    routers 8x, as trained ones are sharper than random ones)."""
    gen = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, model.config.hidden_size, generator=gen)
    return torch.softmax(hidden @ model.model.layers[0].mlp.gate.weight.T, dim=-1)


def route(probs: torch.Tensor, k: int, c: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, k], weights [N, k]): the budget pass's two ops around Qwen3-MoE's router (top-k of the softmax,
    renormalized), substitute policy, the op's own slot; the budget comes from `msc.budget` around the call."""
    values, ids, keep = torch.ops.moespec.budget_topk(probs, probs, k, "identity", register_spec(c), "substitute",
                                                      -1, True, None, -1, DEFAULT_SCORE)
    return torch.ops.moespec.budget_apply(ids, values / values.sum(-1, keepdim=True), keep, True)


def timed(benchmark, group: str, fn, rounds: int, **extra) -> float | None:
    """Median seconds of `rounds` calls of fn after WARMUP untimed ones (None under --benchmark-disable); extra goes
    to the saved JSON."""
    benchmark.group = group
    benchmark.extra_info.update(extra, threads=torch.get_num_threads())
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=WARMUP, iterations=1)
    return benchmark.stats.stats.median if benchmark.stats else None


def add_rate(benchmark, nbytes: int, median: float | None, bandwidth: float) -> None:
    """Bytes read, the floor at the measured bandwidth, and the rate achieved (GB/s, share of the bandwidth)."""
    benchmark.extra_info.update(bytes=nbytes, bandwidth_gb_per_s=bandwidth / 1e9, floor_ms=nbytes / bandwidth * 1e3)
    if median:
        benchmark.extra_info.update(gb_per_s=nbytes / median / 1e9, of_bandwidth=nbytes / median / bandwidth)


# --- 1. the routing ops --------------------------------------------------------------------------------

@pytest.mark.parametrize("n,c", CASES)
def test_routing(benchmark, model, n, c):
    k = model.config.num_experts_per_tok
    probs = router_probs(model, n)  # [N, E]
    with torch.no_grad(), msc.budget(c):
        ids, weights = route(probs, k, c)
        assert torch.isfinite(weights).all() and bool((ids >= 0).all())
        if c is None:  # exact: the natural top-k
            assert torch.equal(ids, torch.topk(probs, k).indices)
        else:
            assert ids.unique().numel() <= c
        timed(benchmark, f"routing N={n}", lambda: route(probs, k, c), ROUNDS["routing"])


# --- 2. the experts op ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n,c", CASES)
def test_fused_experts(benchmark, model, shape, bandwidth, n, c):
    """fused_experts on ids restricted to C experts, against the bytes of the experts it must read."""
    experts = model.model.layers[0].mlp.experts
    probs = router_probs(model, n)
    with torch.no_grad():
        with msc.budget(c):
            ids, weights = route(probs, model.config.num_experts_per_tok, c)
        hidden = torch.randn(n, model.config.hidden_size, generator=torch.Generator().manual_seed(n + 1))  # [N, H]
        args = (hidden, ids, weights, experts.gate_up_proj, experts.down_proj)
        out = torch.ops.moespec.fused_experts(*args)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, experts(hidden, ids, weights), rtol=1e-4, atol=1e-5)  # the model's own
        used = int(ids.unique().numel())
        median = timed(benchmark, f"experts N={n}", lambda: torch.ops.moespec.fused_experts(*args),
                       ROUNDS["experts"], experts_loaded=used)
    add_rate(benchmark, used * shape.expert_bytes, median, bandwidth)


# --- 3. a whole verify pass ----------------------------------------------------------------------------

def pass_bytes(model, shape: ModelShape, experts_loaded: int, n: int) -> int:
    """Bytes a verify pass of N tokens must read: the experts it loaded, every dense weight but the embedding
    table, of which only N rows."""
    embed = model.get_input_embeddings().weight
    row = embed.shape[1] * embed.element_size()
    return experts_loaded * shape.expert_bytes + shape.dense_bytes - embed.shape[0] * row + n * row


def verify_ids(model, n: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))  # [1, N]


def recorded_pass(compiled, x, c) -> tuple[torch.Tensor, int, int]:
    """(logits, experts loaded over all MoE layers, MoE layers run) of one pass under budget C, untimed."""
    with msc.budget(c), msc.record_experts() as rec:
        logits = compiled(x, use_cache=False).logits
    assert torch.isfinite(logits).all()
    return logits, sum(len(event.experts) for event in rec.events), len(rec.events)


@pytest.mark.parametrize("n", TOKENS, ids=[f"N{n}" for n in TOKENS])
def test_verify_plain(benchmark, model, shape, bandwidth, compiled, plain, n):
    """The reference beside each N's moespec rows: the unmodified model through inductor. It loads the exact
    pass's experts (the natural top-k), recorded from the moespec graph."""
    x = verify_ids(model, n)
    with torch.no_grad():
        _, loaded, layers = recorded_pass(compiled, x, None)
        assert torch.isfinite(plain(x, use_cache=False).logits).all()  # compiles, untimed
        median = timed(benchmark, f"verify N={n}", lambda: plain(x, use_cache=False), ROUNDS["verify"],
                       experts_per_layer=loaded / layers)
    add_rate(benchmark, pass_bytes(model, shape, loaded, n), median, bandwidth)


@pytest.mark.parametrize("n,c", CASES)
def test_verify_moespec(benchmark, model, shape, bandwidth, compiled, plain, n, c):
    """The model compiled by moespec (inner inductor) on N tokens under msc.budget(C)."""
    x = verify_ids(model, n)
    with torch.no_grad():
        logits, loaded, layers = recorded_pass(compiled, x, c)  # compiles on an N's first case
        if c is None:
            torch.testing.assert_close(logits, plain(x, use_cache=False).logits, rtol=1e-4, atol=1e-4)
        with msc.budget(c):
            median = timed(benchmark, f"verify N={n}", lambda: compiled(x, use_cache=False), ROUNDS["verify"],
                           experts_per_layer=loaded / layers)
    add_rate(benchmark, pass_bytes(model, shape, loaded, n), median, bandwidth)
