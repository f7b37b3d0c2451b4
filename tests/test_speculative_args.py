"""Argument checks of the speculative decoder, its trees and drafters (issue 10 item 11): every bad value is a
ValueError that names the argument, raised before any work (no silent truncation, no raw TypeError or
IndexError from deep inside). One decoder per module; nothing here runs a forward pass except the good call."""

from __future__ import annotations

import pytest
import torch

import moe_spec_compile as msc
from moe_spec_compile.speculative.tree import StaticTree

from moe_models import VOCAB, build

PROMPT = torch.tensor([[5, 17, 33, 2]])


@pytest.fixture(scope="module")
def dec():
    return msc.SpeculativeDecoder(build("qwen3_moe")[0], drafter=msc.NgramDrafter(), tree=2)


BAD_GENERATE = [
    ("max_new_tokens", dict(max_new_tokens=-3)),
    ("max_new_tokens", dict(max_new_tokens=0)),
    ("max_new_tokens", dict(max_new_tokens=2.5)),
    ("max_new_tokens", dict(max_new_tokens=True)),
    ("top_k", dict(do_sample=True, top_k=2.5)),
    ("top_k", dict(do_sample=True, top_k=0)),
    ("temperature", dict(do_sample=True, temperature=0.0)),
    ("temperature", dict(do_sample=True, temperature=-1)),
    ("temperature", dict(do_sample=True, temperature="hot")),
    ("top_p", dict(do_sample=True, top_p=0.0)),
    ("top_p", dict(do_sample=True, top_p=1.5)),
    ("top_p", dict(top_p=-0.1)),
    ("do_sample", dict(do_sample="yes")),
    ("tree", dict(tree=[(0.5,)])),
    ("tree", dict(tree=[(0, -1)])),
    ("tree", dict(tree=[()])),
    ("tree", dict(tree=2.5)),
    ("tree", dict(tree=-1)),
    ("tree rank", dict(tree=[(0,), (VOCAB,)])),
    ("top_k=", dict(tree=msc.TreeSpec(4, 2, VOCAB + 1))),
]


@pytest.mark.parametrize("name,kwargs", BAD_GENERATE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_GENERATE)])
def test_bad_generate_arguments(dec, name, kwargs):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        dec.generate(PROMPT, **kwargs)


@pytest.mark.parametrize("ids", [PROMPT.float(), PROMPT.bool(), torch.tensor([[1, VOCAB]]), torch.tensor([[-2, 3]])],
                         ids=["float", "bool", "above-vocab", "negative"])
def test_bad_input_ids(dec, ids):
    with pytest.raises(ValueError, match="input_ids"):
        dec.generate(ids, max_new_tokens=2)


def test_good_call_still_works(dec):
    """The checks let the ordinary call through: greedy equals the target's own argmax decoding."""
    out = dec.generate(PROMPT, max_new_tokens=5, eos_token_id=None, tree=[(0,), (1,), (0, 0)])
    ref = dec.eager_target.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=5,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.sequences.tolist() == ref.tolist()


@pytest.mark.parametrize("kwargs,name", [(dict(max_matches=0), "max_matches"), (dict(max_matches=2.5), "max_matches"),
                                         (dict(max_ngram=0), "max_ngram"), (dict(min_ngram=0), "min_ngram"),
                                         (dict(min_ngram=4, max_ngram=2), "min_ngram")])
def test_bad_ngram_drafter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        msc.NgramDrafter(**kwargs)


def test_bad_tree_shapes():
    with pytest.raises(ValueError, match="TreeSpec.depth"):
        msc.TreeSpec(4, 2.0, 1)
    with pytest.raises(ValueError, match="tree paths"):
        StaticTree([(1, 0.0)])
    assert StaticTree([(1, 0)]).paths == ((1,), (1, 0))


def test_bad_tree_in_constructor():
    model = build("qwen3_moe")[0]
    with pytest.raises(ValueError, match="tree rank"):
        msc.SpeculativeDecoder(model, tree=[(VOCAB + 3,)])


def test_a_slow_cpu_environment_is_reported_once(monkeypatch):
    """OMP_WAIT_POLICY=PASSIVE (read when torch loads OpenMP, so moespec cannot undo it) slows every multi-token
    CPU pass: building a decoder says so once per process, naming the variable and the fix; nothing otherwise."""
    import warnings

    from moe_spec_compile.speculative import checks

    target = build("qwen3_moe")[0]
    monkeypatch.setattr(checks, "_WARNED_ENV", set())
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails here
        msc.SpeculativeDecoder(target, tree=2)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    with pytest.warns(RuntimeWarning, match="OMP_WAIT_POLICY=PASSIVE.*Unset it"):
        msc.SpeculativeDecoder(target, tree=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: not again
        msc.SpeculativeDecoder(target, tree=2)
    assert "OMP_WAIT_POLICY" in checks.warn_slow_cpu_environment(torch.device("cpu"))
    assert checks.warn_slow_cpu_environment(torch.device("meta")) is None


@pytest.mark.parametrize("policy", ["PASSIVE", None])
def test_passive_wait_policy_decodes_with_one_thread_and_restores(monkeypatch, policy):
    """Under OMP_WAIT_POLICY=PASSIVE generate's passes run with one intra-op thread (measured: as fast as the
    setting's absence on small passes, 3x faster than two sleeping threads), the caller's count restored after,
    even when generate raises; without it the count is left alone. Tokens are the same either way."""
    from moe_spec_compile.speculative import checks

    target = build("qwen3_moe")[0]
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(checks, "_WARNED_ENV", {"omp_wait_policy"})  # the warning has its own test
    if policy:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    else:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dec = msc.SpeculativeDecoder(target, msc.NgramDrafter(), tree=2)
        seen = []
        step = dec._step
        monkeypatch.setattr(dec, "_step", lambda *a: seen.append(torch.get_num_threads()) or step(*a))
        out = dec.generate(ids, max_new_tokens=6, eos_token_id=None)
        assert seen and set(seen) == {1 if policy else 2}
        assert torch.get_num_threads() == 2
        with torch.no_grad():
            want = target.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert torch.equal(out.sequences, want)
        monkeypatch.setattr(dec, "_step", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            dec.generate(ids, max_new_tokens=6, eos_token_id=None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
