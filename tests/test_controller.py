"""The oracle drafter, budgets that cannot bind, and the controller (tree="auto", budget="auto") against the
target's own greedy decoding. Target: a tiny random Qwen3-MoE (tests/moe_models.py)."""

from __future__ import annotations

import pytest
import torch

import moe_spec_compile as msc
from moe_spec_compile.speculative.tree import TreeSpec

from moe_models import build

PROMPT = torch.tensor([[5, 17, 33, 2, 90, 41, 8]])


@pytest.fixture(scope="module")
def target():
    return build("qwen3_moe")[0]


def reference(model, prompt, n):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0].tolist()


@pytest.mark.parametrize("tree", [4, TreeSpec(8, 3, 3)], ids=["chain4", "tree8"])
def test_oracle_at_acceptance_one_accepts_every_draft(target, tree):
    oracle = msc.OracleDrafter(target, acceptance=1.0)
    dec = msc.SpeculativeDecoder(target, drafter=oracle, tree=tree)
    out = dec.generate(PROMPT, max_new_tokens=21, eos_token_id=None)
    assert out.sequences[0].tolist() == reference(target, PROMPT, 21)
    depth = min(dec.tree.depth, dec.tree.max_nodes)
    assert out.stats.accepted_per_step[:-1] == [depth + 1] * (len(out.stats.accepted_per_step) - 1)
    assert all(v.tree_size == dec.tree.max_nodes + 1 for v in out.stats.verify)  # the shape's size, filled
    t = out.stats.summary()["time_s"]  # the phases and the loop's own host work, split
    assert set(t) == {"prefill", "draft", "verify", "accept", "host", "total"} and t["host"] >= 0
    assert t["total"] >= t["draft"] + t["verify"] + t["accept"] > 0


def test_oracle_partial_acceptance_stays_exact(target):
    rates = []
    for a in (0.0, 0.5):
        oracle = msc.OracleDrafter(target, acceptance=a, seed=3)
        oracle.precompute([PROMPT], 30)
        out = msc.SpeculativeDecoder(target, drafter=oracle, tree=4).generate(PROMPT, max_new_tokens=30,
                                                                            eos_token_id=None)
        assert out.sequences[0].tolist() == reference(target, PROMPT, 30)
        rates.append(out.stats.tokens_per_step)
    assert rates[0] == 1.0 and 1.2 < rates[1] < 3.0  # 0.5: 1 + .5 + .25 + ... ~ 1.9
    with pytest.raises(ValueError, match="acceptance"):
        msc.OracleDrafter(target, acceptance=1.5)


def test_budget_without_moespec_target_is_refused(target):
    with pytest.raises(ValueError, match="compile=True"):
        msc.SpeculativeDecoder(target, tree=2, budget=4)
    dec = msc.SpeculativeDecoder(target, tree=2)
    with pytest.raises(ValueError, match="backend=\"moespec\""):
        dec.generate(PROMPT, max_new_tokens=4, budget=4)
    with pytest.raises(ValueError, match="compile=True"):
        msc.SpeculativeDecoder(torch.compile(target, backend="eager"), tree=2, budget=lambda step: 4)
    # compiled by the caller with the moespec backend: the budget binds, and is taken
    own = torch.compile(target, backend="moespec", dynamic=False, options={"inner": "eager", "max_budget_tokens": None})
    out = msc.SpeculativeDecoder(own, tree=2, budget=4).generate(PROMPT, max_new_tokens=6, eos_token_id=None)
    assert {c for _, c in out.stats.buckets} == {4}
    assert all(max(v.experts_per_layer.values()) <= 4 for v in out.stats.verify)


def virtual_time(dec, per_node: float):
    """Replace the decoder's clock by a virtual one: each verify pass of n nodes costs 1 + per_node * n ms, and
    nothing else costs time. The controller's decisions then follow from this cost alone (no timing noise)."""
    clock = [0.0]
    verify = dec.verify

    def timed_verify(tree, c):
        clock[0] += 1e-3 * (1 + per_node * tree.size)
        return verify(tree, c)

    dec.verify = timed_verify
    dec._clock = lambda: clock[0]


def test_controller_falls_back_to_autoregressive_with_a_wrong_drafter(target):
    oracle = msc.OracleDrafter(target, acceptance=0.0, seed=5)  # every drafted token wrong
    oracle.precompute([PROMPT], 40)
    dec = msc.SpeculativeDecoder(target, drafter=oracle, tree="auto")
    virtual_time(dec, 0.05)
    for _ in range(2):
        out = dec.generate(PROMPT, max_new_tokens=40, eos_token_id=None)
        assert out.sequences[0].tolist() == reference(target, PROMPT, 40)
    trace = out.stats.decisions
    assert len(trace) == out.stats.steps and all(d.tokens == 1 for d in trace)
    sets = [d for d in trace if d.phase == "set"]
    assert sets and all(d.tree == "ar" for d in sets)
    assert sum(d.tree == "ar" for d in trace) >= 0.9 * len(trace)  # speculation only in one-step probes


def test_back_off_spans_requests_and_skips_the_drafter_it_outlasts(target):
    """With a drafter that is always wrong the autoregressive set phases keep doubling across requests, up to
    2**max_backoff x set_steps: a request such a phase outlasts starts no drafter (no draft prefill, no catch-up) and
    drafts nothing; output stays the target's greedy output."""
    oracle = msc.OracleDrafter(target, acceptance=0.0, seed=5)
    oracle.precompute([PROMPT], 24)
    dec = msc.SpeculativeDecoder(target, drafter=oracle, tree="auto")
    virtual_time(dec, 0.05)
    starts, start = [], oracle.start
    oracle.start = lambda *a, **k: starts.append(1) or start(*a, **k)
    want, started, drafted = reference(target, PROMPT, 24), [], []
    for _ in range(10):
        n = len(starts)
        out = dec.generate(PROMPT, max_new_tokens=24, eos_token_id=None)
        assert out.sequences[0].tolist() == want
        started.append(len(starts) > n)
        drafted.append(any(d.tree != "ar" for d in out.stats.decisions))
    assert not any(d and not s for d, s in zip(drafted, started))  # only a started drafter drafts
    assert started[0] and sum(started) <= 7, started  # phases of 16, 32, 64, 64, ... steps; requests of 23
    ctl = dec.controller
    assert ctl.fallbacks >= 3 and ctl.left <= ctl.set_steps * 2 ** ctl.max_backoff


def test_acceptance_is_pooled_and_switching_steps_are_not_timed():
    """The acceptance per depth pools recent steps of every config (one step that accepted nothing moves it a little;
    chains' tokens per step follow from it by the chain law), and a step observed as untimed (a first draft after
    autoregressive steps, an exact path still being measured) neither enters the config's times nor ends a phase."""
    from moe_spec_compile.cost import chain_tokens
    from moe_spec_compile.speculative.controller import Controller

    ctl = Controller(trees=(0, 2, 4))
    ctl.start()
    chain2, chain4 = (next(c for c in ctl.configs if c[0].max_nodes == n) for n in (2, 4))
    for _ in range(8):
        ctl.observe(chain2, 3.0, 2e-3, (1, 3, None))  # every drafted token accepted
    assert ctl.times[chain2] == [2e-3] * 5 and ctl._alpha() > 0.9  # the first two runs of a bucket: warm-up
    left = ctl.left
    ctl.observe(chain2, 3.0, 9.0, (1, 3, None), timed=False)
    assert ctl.times[chain2] == [2e-3] * 5 and ctl.left == left
    ctl.observe(chain4, 1.0, 3e-3, (1, 5, None))  # one step of chain 4 that accepted nothing
    alpha = ctl._alpha()
    assert 0.8 < alpha < 0.98
    assert ctl.tokens_per_step(chain4) == pytest.approx(chain_tokens(alpha, 4)) and ctl.tokens_per_step(chain4) > 3


def test_a_first_draft_after_autoregressive_steps_is_not_timed(target):
    """Through the decoder: the step that drafts right after autoregressive steps (it feeds the drafter what they
    committed) is charged a large virtual cost here, and none of it reaches the controller's step times."""
    oracle = msc.OracleDrafter(target, acceptance=0.0, seed=5)  # wrong: autoregressive phases, then probes
    oracle.precompute([PROMPT], 40)
    dec = msc.SpeculativeDecoder(target, drafter=oracle, tree="auto")
    virtual_time(dec, 0.05)
    clock, step, last = dec._clock, dec._step, {"ar": False}
    extra = [0.0]
    dec._clock = lambda: clock() + extra[0]

    def charged(shape, *a, **k):
        if last["ar"] and shape.max_nodes:
            extra[0] += 100.0  # the catch-up
        last["ar"] = not shape.max_nodes
        return step(shape, *a, **k)

    dec._step = charged
    want = reference(target, PROMPT, 40)
    for _ in range(4):
        assert dec.generate(PROMPT, max_new_tokens=40, eos_token_id=None).sequences[0].tolist() == want
    assert extra[0] > 0  # the trace did switch from autoregressive steps to drafting
    times = [t for by_cfg in dec.controller._times_by_rows.values() for ts in by_cfg.values() for t in ts]
    assert times and max(times) < 1.0


def test_controller_speculates_with_the_oracle_and_stays_exact(target):
    oracle = msc.OracleDrafter(target, acceptance=1.0)
    oracle.precompute([PROMPT], 48)
    dec = msc.SpeculativeDecoder(target, drafter=oracle, tree="auto")
    virtual_time(dec, 0.05)  # chain 4: 5 tokens for 1.25x an AR step, the best utility of the default trees
    for _ in range(2):
        out = dec.generate(PROMPT, max_new_tokens=48, eos_token_id=None)
        assert out.sequences[0].tolist() == reference(target, PROMPT, 48)
    sets = [d for d in out.stats.decisions if d.phase == "set"]
    assert sets and all(d.tree == "chain4" for d in sets)
    assert out.stats.tokens_per_step > 4


def test_budget_auto(target):
    with pytest.raises(ValueError, match="compile=True"):
        msc.SpeculativeDecoder(target, tree=4, budget="auto", min_budget=4)
    dec = msc.SpeculativeDecoder(target, drafter=msc.OracleDrafter(target, 1.0), tree=4, budget="auto")
    assert [c for _, c in dec.controller.configs] == [None]  # no min_budget: exact only
    out = dec.generate(PROMPT, max_new_tokens=12, eos_token_id=None)
    assert out.sequences[0].tolist() == reference(target, PROMPT, 12) and {v.budget for v in out.stats.verify} == {None}
    dec = msc.SpeculativeDecoder(target, drafter=msc.OracleDrafter(target, 1.0), tree="auto", budget="auto",
                                 min_budget=4, compile=True, compile_options={"inner": "eager"})
    assert sorted({c or 0 for _, c in dec.controller.configs}) == [0, 4, 8]  # E = 16: 4, 8 and exact
    out = dec.generate(PROMPT, max_new_tokens=24, eos_token_id=None)
    assert {v.budget for v in out.stats.verify} <= {None, 4, 8}
    with pytest.raises(ValueError, match="min_budget"):
        msc.SpeculativeDecoder(target, tree=4, min_budget=4)


def test_a_stable_choice_is_retested_ever_more_rarely(target):
    """The same speculative config winning the test phase after its own set phase gets a set phase twice as long:
    over several requests the set runs grow (16, 32, ...) and test steps become a shrinking share."""
    oracle = msc.OracleDrafter(target, acceptance=1.0)
    oracle.precompute([PROMPT], 48)
    dec = msc.SpeculativeDecoder(target, drafter=oracle, tree="auto")
    virtual_time(dec, 0.05)
    trace = []
    for _ in range(8):
        out = dec.generate(PROMPT, max_new_tokens=48, eos_token_id=None)
        assert out.sequences[0].tolist() == reference(target, PROMPT, 48)
        trace += out.stats.decisions
    runs, last = [], None
    for d in trace:
        if d.phase == "set" and last == "set":
            runs[-1] += 1
        elif d.phase == "set":
            runs.append(1)
        last = d.phase
    assert all(d.tree == "chain4" for d in trace if d.phase == "set")
    assert len(runs) >= 2 and runs[1] > dec.controller.set_steps, runs  # the second set phase doubled
    assert dec.controller.streak >= 1
