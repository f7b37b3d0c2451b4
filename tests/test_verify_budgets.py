"""The verify pass under budgets as data (issue 9 item 6, issue 10 item 5): one graph per tree-size bucket serves
every budget, each pass runs under exactly the budget asked for, node weights reach the expert scores and
padding rows weigh nothing. References: the eager model routed in plain PyTorch (tests/reference.py) on the
same pass, and the draft model's own log-probabilities."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import moe_spec_compile as msc
from moe_spec_compile.speculative.accept import SamplingConfig
from moe_spec_compile.speculative.buckets import DEFAULT_TREE_BUCKETS
from moe_spec_compile.speculative.kv import forward
from moe_spec_compile.speculative.tree import DraftTree, StaticTree
from moe_spec_compile.speculative.weights import DEPTH_DECAY, node_weights

from moe_models import build, experts_of, tiny_draft
from reference import reference_budget

PROMPT = torch.tensor([[5, 17, 33, 2, 90, 41, 8, 5, 17]])
TREE = msc.TreeSpec(8, 3, 2)


@pytest.fixture(scope="module")
def target():
    return build("qwen3_moe", seed=3)[0]


@pytest.fixture(scope="module")
def draft():
    return tiny_draft()


@pytest.fixture(scope="module")
def decoder(target, draft):
    torch._dynamo.reset()
    return msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=TREE, compile=True,
                                  compile_options={"inner": "eager"}, node_weights="path",
                                  tree_buckets=DEFAULT_TREE_BUCKETS)  # given: TREE's 9 nodes pad to 16


class _Spy:
    """Wraps a VerifyRunner and keeps the arguments of each call."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __call__(self, *args):
        self.calls.append(args)
        return self.runner(*args)


@torch.no_grad()
def _one_verify(dec, c):
    """Prefill PROMPT, draft one tree, verify it under c -> (logits [n, V], the runner's arguments, VerifyStats)."""
    dec.begin(PROMPT, None, 16, dec.tree, SamplingConfig(), drafting=True)
    tree = dec.drafter.draft(dec.roots, dec.tree, dec.live)
    spy = dec.runner = _Spy(dec.runner)
    try:
        logits, stat = dec.verify(tree, c)
    finally:
        dec.runner = spy.runner
    return logits[0, : stat.tree_size], spy.calls[-1], stat


@torch.no_grad()
def _reference(dec, call, c, weights, rows=None):
    """The same pass (its first `rows` tokens) through the eager target routed in plain PyTorch."""
    tokens, pos, mask, slots = call[1:5]  # the runner's (cache, tokens, positions, mask, slots, c, weights)
    n = rows or tokens.shape[1]
    mask = {k: v[..., :n, :] for k, v in mask.items()} if isinstance(mask, dict) else mask[..., :n, :]
    with reference_budget(dec.eager_target, c, dec.policy, weights=weights):
        return forward(dec.eager_target, dec.cache, tokens[:, :n], pos[:, :n], mask, slots[:, :n],
                       dec._cache_position)[0]


def _close(a, b, tol=1e-4):
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), (a - b).abs().max().item()


def test_one_graph_per_bucket_serves_every_budget(decoder, target):
    """Budgets None, 5 and 8 switch on the graphs already compiled: no recompile; every pass records at most C
    experts per layer and reports exactly C (never a bucket above it)."""
    e, k = experts_of(target)
    assert 5 < e
    decoder.generate(PROMPT, max_new_tokens=8, eos_token_id=None)  # compiles the buckets this prompt uses
    frames = counters["frames"]["total"]
    for c in (5, 8, None, 5):
        out = decoder.generate(PROMPT, max_new_tokens=8, eos_token_id=None, budget=c)
        for v in out.stats.verify:
            assert v.budget == c
            assert len(v.experts_per_layer) == target.config.num_hidden_layers
            assert max(v.experts_per_layer.values()) <= (c or e)
            assert set(v.layer_budgets.values()) == {c}
        assert c is None or any(v.budget_bound for v in out.stats.verify)
    assert counters["frames"]["total"] == frames


def test_verify_equals_eager_reference_with_the_same_weights(decoder):
    """The compiled verify pass under C = 5 with path node weights equals the eager model routed under C = 5 with
    the same token weights (padding included, at weight 0)."""
    logits, call, stat = _one_verify(decoder, 5)
    weights = call[6]
    n = stat.tree_size
    assert weights.shape[0] == stat.bucket > n  # padded, padding at 0, nodes by path probability
    assert (weights[n:] == 0).all() and weights[0] == 1 and (weights[1:n] < 1).all() and (weights[1:n] > 0).all()
    want = _reference(decoder, call, 5, weights)[:n]
    _close(logits[:, : want.shape[1]], want[:, : logits.shape[1]])


def test_padding_rows_do_not_vote(target, draft):
    """A tree padded to a large bucket picks the same experts as the same tree unpadded: the verify logits equal
    the eager reference on the unpadded pass. Weighing the padding (the old behaviour: it repeats the root) would
    change them, so the check is sensitive."""
    dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=TREE, compile=True,
                                 compile_options={"inner": "eager"}, node_weights="uniform", tree_buckets=(32,))
    c = experts_of(target)[1] + 1
    logits, call, stat = _one_verify(dec, c)
    n, weights = stat.tree_size, call[6]
    assert stat.bucket == 32 and (weights[:n] == 1).all() and (weights[n:] == 0).all()
    unpadded = _reference(dec, call, c, weights[:n], rows=n)
    _close(logits, unpadded[:, : logits.shape[1]])
    padding_votes = _reference(dec, call, c, torch.ones_like(weights))[:n]
    assert (padding_votes[:, : logits.shape[1]] - logits).abs().max() > 1e-3


@torch.no_grad()
def test_model_drafter_path_probabilities(draft):
    """DraftTree.logprob of a chain and a static tree: the draft model's own cumulative log-probabilities."""
    for shape in (msc.TreeSpec(3, 3, 1), StaticTree([(0,), (1,), (0, 0), (1, 0)])):
        drafter = msc.ModelDrafter(draft)
        drafter.start(PROMPT[:, :-1], [0], 64)
        tree = drafter.draft([int(PROMPT[0, -1])], shape, [True])
        assert tree.logprob is not None and tree.logprob[0, 0] == 0
        for i in range(1, tree.size):
            path = [i]
            while path[-1] > 0:
                path.append(int(tree.parents[0, path[-1]]))
            toks = tree.tokens[0, list(reversed(path))]  # root .. node i
            seq = torch.cat([PROMPT[0], toks[1:]])[None]
            logp = torch.log_softmax(draft(seq).logits[0].float(), -1)
            start = PROMPT.shape[1] - 1
            want = sum(logp[start + j, toks[j + 1]] for j in range(len(toks) - 1))
            assert abs(float(tree.logprob[0, i]) - float(want)) < 1e-4


def test_node_weight_options():
    tree = DraftTree(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[-1, 0, 1, 0]]), torch.tensor([[0, 1, 2, 1]]),
                     logprob=torch.tensor([[0.0, -0.5, -1.5, -2.0]]))
    assert node_weights(tree.padded(6), "uniform").tolist() == [1, 1, 1, 1, 0, 0]
    assert node_weights(tree.padded(5), "depth").tolist() == [1, DEPTH_DECAY, DEPTH_DECAY**2, DEPTH_DECAY, 0]
    torch.testing.assert_close(node_weights(tree, "path"), torch.tensor([0.0, -0.5, -1.5, -2.0]).exp())
    tree.logprob = None  # a drafter without probabilities (NgramDrafter): uniform
    assert node_weights(tree.padded(5), "path").tolist() == [1, 1, 1, 1, 0]
    two = DraftTree.from_lists([([1, 2, 3], [-1, 0, 1]), ([4], [-1])], "cpu").padded(4, torch.tensor([True, False]))
    assert node_weights(two, "uniform").tolist() == [1, 1, 1, 0] + [0] * 4  # a dead row and padding: 0


@pytest.mark.parametrize("key", ["budget", "policy", "max_budget_tokens"])
def test_budget_compile_options_are_refused(target, key):
    value = {"budget": 5, "policy": "truncate", "max_budget_tokens": 4}[key]
    with pytest.raises(ValueError, match=rf"compile_options\['{key}'\].*(budget=|policy=|prefill)"):
        msc.SpeculativeDecoder(target, compile=True, compile_options={key: value})


def test_deprecated_budget_buckets_and_bad_node_weights(target):
    with pytest.warns(DeprecationWarning, match="budget_buckets"):
        msc.SpeculativeDecoder(target, budget_buckets=(4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        msc.SpeculativeDecoder(target)
    with pytest.raises(ValueError, match="node_weights"):
        msc.SpeculativeDecoder(target, node_weights="probability")
