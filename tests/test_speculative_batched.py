"""Batched speculative decoding against transformers' own batched generate (left padding, attention mask),
row by row: chains and trees, both drafters, prompts of different lengths, EOS in some rows; sampling keeps
the target's distribution; a budget bounds every verify pass of the batch; batch size 1 is unchanged.

Target: a tiny random Qwen3-MoE (tests/moe_models.py); drafts: a tiny dense Qwen3, the target itself (whole
paths accepted, so compaction, overshoot and rows finishing mid-path get exercised) and n-gram lookup."""

from __future__ import annotations

import collections

import pytest
import torch
from graph_replay import emulate_cuda_graphs
from test_speculative_sampling import CHI2_TAIL, _tiny_pair, chi2

import moe_spec_compile as msc
from moe_spec_compile.speculative import Drafter, GenerateStats, RowDrafter
from moe_spec_compile.speculative.accept import accept_greedy
from moe_spec_compile.speculative.buckets import VerifyRunner
from moe_spec_compile.speculative.kv import TreeCache
from moe_spec_compile.speculative.tree import DraftTree

from moe_models import build, tiny_draft

STATIC = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
PADS = [0, 4, 2, 7, 1]  # left padding per row: prompts of 10, 6, 8, 3 and 9 tokens
PAD_ID = 0


@pytest.fixture(scope="module")
def target():
    return build("qwen3_moe")[0]


@pytest.fixture(scope="module")
def draft():
    return tiny_draft()


def left_padded(pads, length=10, seed=0, vocab=96):
    ids = torch.randint(1, vocab, (len(pads), length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return ids.masked_fill(mask == 0, PAD_ID), mask


def reference(model, ids, mask, n, eos=None):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                          pad_token_id=PAD_ID)


@pytest.fixture(scope="module")
def batch(target):
    """Prompts, the free reference, and an EOS token that stops row 1 after 6 tokens (and maybe others)."""
    ids, mask = left_padded(PADS)
    free = reference(target, ids, mask, 16)
    eos = int(free[1, 10 + 5])
    return ids, mask, free, eos, reference(target, ids, mask, 16, eos)


def _new_tokens(row: list[int], eos) -> int:
    return row.index(eos) + 1 if eos in row else len(row)


def make_drafter(kind, target, draft):
    return {"draft": lambda: msc.ModelDrafter(draft), "self": lambda: msc.ModelDrafter(target),
            "ngram": lambda: msc.NgramDrafter()}[kind]()


@pytest.mark.parametrize("kind", ["draft", "self", "ngram"])
@pytest.mark.parametrize("tree", [3, msc.TreeSpec(8, 3, 2), STATIC], ids=["chain3", "dyn8-3-2", "static6"])
def test_greedy_equals_batched_generate(target, draft, batch, kind, tree):
    """Budget None, greedy: every row token for token as transformers' batched generate, with and without
    EOS (rows that stop early are padded after their EOS; the width is the longest row's)."""
    ids, mask, free, eos, stopped = batch
    dec = msc.SpeculativeDecoder(target, drafter=make_drafter(kind, target, draft), tree=tree)
    for e, want in ((None, free), (eos, stopped)):
        out = dec.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=e, pad_token_id=PAD_ID)
        assert out.sequences.tolist() == want.tolist(), (kind, tree, e)
        assert isinstance(out.stats, GenerateStats) and len(out.stats.rows) == 5
        assert [r.new_tokens for r in out.stats.rows] == [_new_tokens(row, e) for row in free[:, 10:].tolist()]
    if kind == "self":  # the draft is the target: whole paths get accepted
        assert out.stats.tokens_per_step > 2


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_families(family):
    """DeepSeek-V3 (MLA: different key and value head dims) and GPT-OSS (sliding layers, window 16, with
    sequences longer than the window) in a left-padded batch."""
    model = build(family)[0]
    ids, mask = left_padded([0, 5, 2], length=12, seed=2)
    dec = msc.SpeculativeDecoder(model, drafter=msc.ModelDrafter(model), tree=msc.TreeSpec(6, 3, 2))
    out = dec.generate(ids, attention_mask=mask, max_new_tokens=14, eos_token_id=None)
    assert out.sequences.tolist() == reference(model, ids, mask, 14).tolist()


def test_finished_rows_leave_the_pass(target, batch):
    """Rows stop on their own: after row 1's EOS the live rows move to a smaller rows bucket, finished rows
    stop voting, and the stats say so per row."""
    ids, mask, _, eos, stopped = batch
    dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(target), tree=3)
    out = dec.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=PAD_ID)
    assert out.sequences.tolist() == stopped.tolist()
    v = out.stats.verify
    assert v[0].row_bucket == 8 and v[0].rows == 5 and v[-1].rows < 5 and v[-1].row_bucket < 8
    assert all(x.tokens <= x.rows * x.tree_size for x in v)
    rows = out.stats.rows
    assert rows[1].new_tokens == 6 and rows[1].steps < rows[0].steps or rows[0].new_tokens < 16
    s = out.stats.summary()
    assert s["rows"] == 5 and s["new_tokens"] == sum(r.new_tokens for r in rows) and len(s["per_row"]) == 5


def test_kv_compaction_matches_recompute(target, draft):
    """After generation each row of the compacted caches (target's and drafter's) holds the KV a fresh
    forward of that row's unpadded sequence computes (rows still in the last pass; dec.row_of maps them)."""
    pads = [0, 3, 5]
    ids, mask = left_padded(pads, seed=3)
    dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=msc.TreeSpec(10, 4, 3))
    out = dec.generate(ids, attention_mask=mask, max_new_tokens=14, eos_token_id=None)
    checked = 0
    for model, cache in ((target, dec.cache), (draft, dec.drafter.cache)):
        assert isinstance(cache, TreeCache)
        for i, b in enumerate(dec.row_of):
            if b < 0:
                continue
            p, end = pads[b], int(cache.lengths[i])
            assert end >= out.sequences.shape[1] - 2
            with torch.no_grad():
                ref = model(out.sequences[b : b + 1, p:end], use_cache=True).past_key_values
            for j, layer in enumerate(cache.layers):
                assert torch.allclose(layer.keys[i, :, p:end], ref.layers[j].keys[0], atol=1e-5)
                assert torch.allclose(layer.values[i, :, p:end], ref.layers[j].values[0], atol=1e-5)
                checked += 1
    assert checked >= 3


def test_padding_nodes_mirror_the_root(target):
    """A tree bucket's padding node, and every node of a dead row, computes its row's root output (same token,
    position and view), so under exact routing it adds no experts; acceptance never takes it."""
    ids, mask = left_padded([0, 3, 1], seed=4)
    dec = msc.SpeculativeDecoder(target, drafter=msc.NgramDrafter(), tree=msc.TreeSpec(6, 3, 2))
    dec.generate(ids, attention_mask=mask, max_new_tokens=1, eos_token_id=None)  # prefill only: 4 rows stay
    r = dec.cache.rows
    rows = lambda xs: torch.tensor([xs] * r)  # noqa: E731
    tree = DraftTree(rows([7, 8, 9]), rows([-1, 0, 1]), rows([0, 1, 2]), rows([True] * 3))
    dec.live = [True, False] + [True] * (r - 2)
    live = torch.tensor(dec.live)
    logits, _ = dec.verify(tree, None)
    padded, anc = dec._tree, dec._anc
    assert r == 4 and logits.shape[1] == 4 and not padded.valid[:, 3].any() and not padded.valid[1].any()
    assert torch.allclose(logits[:, 3], logits[:, 0], atol=1e-5)
    assert torch.allclose(logits[1], logits[1, :1].expand(4, -1), atol=1e-5)  # the dead row: all as its root
    assert not torch.allclose(logits[0, 1], logits[0, 0], atol=1e-3)
    acc = accept_greedy(padded, logits, anc, live)
    assert not acc.on_path[:, 3].any() and not acc.on_path[1].any()


def test_batch_of_one_is_batch_one(target, draft):
    """One core: a batch of one through the batched entry (an attention mask, with or without padding) equals batch
    1 token for token and step for step; a row decoded in a batch emits what it emits alone."""
    ids, mask = left_padded([0, 4], seed=5)
    dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=3)
    alone = dec.generate(ids[:1], max_new_tokens=9, eos_token_id=None)
    assert alone.sequences.tolist() == reference(target, ids[:1], mask[:1], 9).tolist()
    entry = dec.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=9, eos_token_id=None)
    assert entry.sequences.tolist() == alone.sequences.tolist()
    assert entry.stats.accepted_per_step == alone.stats.accepted_per_step and len(entry.stats.rows) == 1
    assert entry.stats.rows[0].accepted_per_step == alone.stats.accepted_per_step
    padded = dec.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=9, eos_token_id=None)
    assert padded.sequences.tolist() == reference(target, ids[1:], mask[1:], 9).tolist()
    both = dec.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=None)
    assert both.sequences[0].tolist() == alone.sequences[0].tolist()
    assert both.sequences[1].tolist() == padded.sequences[0].tolist()


def test_auto_on_a_batch_with_a_drafter_always_wrong(target):
    """tree="auto" on a batch whose drafter is always wrong (an oracle at acceptance 0): the controller measures the
    batch's utility, falls back to autoregressive steps (every set phase), and the tokens stay the target's greedy
    output; the drafter catches up on the rows' tokens committed without a draft."""
    ids, mask = left_padded([0, 3, 1], seed=6)
    want = reference(target, ids, mask, 40).tolist()
    oracle = msc.OracleDrafter(target, acceptance=0.0, seed=1)
    dec = msc.SpeculativeDecoder(target, drafter=oracle, tree="auto")
    out = dec.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=None)
    assert out.sequences.tolist() == want
    d = out.stats.decisions
    assert d and all(x.tree == "ar" for x in d if x.phase == "set") and any(x.phase == "set" for x in d)
    speculative = [x for x in d if x.tree != "ar"]
    assert all(x.tokens == 3 for x in speculative)  # never accepted: one bonus per row and step
    assert len(speculative) <= len(d) // 2


def test_a_drafter_written_per_sequence(target, batch):
    """A user's drafter written for one sequence (RowDrafter: start_row, draft_row, accept_row, skip_row) serves
    batches: greedy output equals generate's, each row's drafter state sees exactly that row's tokens."""
    ids, mask, free, _, _ = batch

    class Repeat(RowDrafter):  # proposes the row's last two tokens again, as a chain
        def start_row(self, tokens):
            return list(tokens)

        def draft_row(self, state, root, shape):
            chain = (state[-2:] + [root])[: shape.max_nodes]
            return [root] + chain, list(range(-1, len(chain)))

        def accept_row(self, state, tokens):
            state.extend(tokens[:-1])

        def skip_row(self, state, root):
            state.append(root)

    drafter = Repeat()
    dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=3)
    out = dec.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None)
    assert out.sequences.tolist() == free.tolist() and out.stats.tokens_per_step > 1
    checked = 0
    for i, b in enumerate(dec.row_of):  # rows of the last pass: each state holds its own row's tokens, no padding
        if b >= 0:
            state = drafter.rows[i]
            assert state == out.sequences[b, PADS[b] :].tolist()[: len(state)] and len(state) >= 10 - PADS[b] + 12
            checked += 1
    assert checked >= 1


def test_bad_input(target):
    dec = msc.SpeculativeDecoder(target, tree=2)
    ids, mask = left_padded([0, 2])
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        dec.generate(ids, attention_mask=mask[:, 1:], max_new_tokens=2)
    right = mask.flip(1)
    with pytest.raises(ValueError, match="right padding"):
        dec.generate(ids, attention_mask=right, max_new_tokens=2)
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        dec.generate(ids, attention_mask=mask * 2, max_new_tokens=2)
    with pytest.raises(ValueError, match="without any token"):
        dec.generate(ids, attention_mask=mask * torch.tensor([[1], [0]]), max_new_tokens=2)

    class Custom(Drafter):
        pass

    with pytest.raises(NotImplementedError, match="Custom does not implement Drafter.start"):
        msc.SpeculativeDecoder(target, drafter=Custom(), tree=2).generate(ids, attention_mask=mask,
                                                                         max_new_tokens=2)


def test_budget_over_the_batch(target, monkeypatch):
    """Compiled target: budget None equals generate; with C, every verify pass of the batch records at most
    C experts per MoE layer, and only live rows' real tree nodes vote (weight > 0), everything else weight 0."""
    torch._dynamo.reset()
    ids, mask = left_padded([0, 4, 2], seed=7)
    dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(target), tree=msc.TreeSpec(6, 3, 2), compile=True,
                                 compile_options={"inner": "eager"})
    out = dec.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    assert out.sequences.tolist() == reference(target, ids, mask, 10).tolist()
    seen = []
    call = VerifyRunner.__call__

    def spy(self, cache, tokens, positions, m, slots, c=None, weights=None):
        if self.budgeted:  # the target's verify passes (a ModelDrafter's runner runs the draft's, unbudgeted)
            seen.append(weights.clone())
        return call(self, cache, tokens, positions, m, slots, c, weights)

    monkeypatch.setattr(VerifyRunner, "__call__", spy)
    for c in (4, 6):
        stats = dec.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, budget=c).stats
        assert stats.verify and all(v.budget == c for v in stats.verify)
        for v in stats.verify:
            assert len(v.experts_per_layer) == 2 and max(v.experts_per_layer.values()) <= c
        assert any(v.budget_bound for v in stats.verify)
    for w, v in zip(seen, [*stats.verify, *stats.verify]):
        assert w.shape[0] == v.row_bucket * v.bucket
    assert all(int((w > 0).sum()) == v.tokens for w, v in zip(seen[-len(stats.verify):], stats.verify))
    assert any(v.tokens < v.row_bucket * v.bucket for v in stats.verify)  # padding rows and nodes weigh 0


def test_sampling_keeps_distribution():
    """64 rows sample at once (two prompts, one left padded): per prompt, the second token given the most
    likely first ~ p(.|prompt, t1) and the third given (t1, t2) ~ p(.|prompt, t1, t2), exact distributions
    from the target; drafts were both accepted and rejected."""
    vocab = 12
    target, draft = _tiny_pair(vocab)
    prompts = [[3, 7, 1, 5], [2, 9, 4]]
    ids = torch.tensor([prompts[0], [PAD_ID] + prompts[1]]).repeat_interleave(32, 0)
    mask = (torch.arange(4) >= torch.tensor([0, 1]).repeat_interleave(32)[:, None]).long()
    want = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            p2 = target(x).logits[0, -1].softmax(-1)
            t1 = int(p2.argmax())
            x = torch.cat([x, torch.tensor([[t1]])], 1)
            p3 = target(x).logits[0, -1].softmax(-1)
            t2 = int(p3.argmax())
            p4 = target(torch.cat([x, torch.tensor([[t2]])], 1)).logits[0, -1].softmax(-1)
            want.append((t1, t2, p3, p4))
    dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=msc.TreeSpec(4, 2, 2))
    torch.manual_seed(4)
    counts = [([0] * vocab, [0] * vocab) for _ in prompts]
    accepted = collections.Counter()
    for _ in range(40):
        out = dec.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=None, do_sample=True)
        for b, (a, bb, c) in enumerate(out.sequences[:, 4:].tolist()):
            k = b // 32
            t1, t2, _, _ = want[k]
            if a == t1:
                counts[k][0][bb] += 1
                if bb == t2:
                    counts[k][1][c] += 1
        for r in out.stats.rows:
            accepted.update(r.accepted_per_step)
    assert accepted[1] and len(accepted) > 1, accepted
    for k in range(2):
        assert sum(counts[k][1]) > 50, counts  # enough samples for the test to have power
        for got, p in ((counts[k][0], want[k][2]), (counts[k][1], want[k][3])):
            stat, dof = chi2(got, p)
            assert stat < CHI2_TAIL.get(dof, 40.0), (k, got, p.tolist(), stat, dof)


def test_bundled_pair():
    """The bundled pair (whatever its size): three prompts of different lengths, a dynamic tree."""
    target, draft, tok = msc.load_tiny()
    tok.padding_side = "left"
    enc = tok(["def main(", "import os\nimport sys\n", "class Foo:\n    def"], return_tensors="pt", padding=True)
    dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=msc.TreeSpec(6, 3, 2))
    out = dec.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=12)
    want = target.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=12, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    assert out.sequences.tolist() == want.tolist()


def test_graph_runner_reuses_a_shape_exact_then_budgeted(monkeypatch, target):
    """The CUDA-graph path of VerifyRunner, emulated on the CPU (graph_replay.py): one pass shape first run
    exact (no token weights), then under budgets, replays with the budgeted passes' weights (padding weighs 0). It
    once replayed them with every weight 1, so padding nodes voted for experts: the batched graphs then differed
    from eager passes in a left-padded row (H200, test_cuda_graphs_batched below), as this emulation did before
    the fix."""
    emulate_cuda_graphs(monkeypatch)
    ids, mask = left_padded([0, 4, 2], seed=7)
    runs = {}
    for graphs in (True, False):
        dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(target), tree=msc.TreeSpec(6, 3, 2),
                                     compile=True, compile_options={"inner": "eager"})
        dec.runner.use_graphs = graphs
        outs = [dec.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, budget=c)
                for c in (None, 4, 6)]
        runs[graphs] = [out.sequences.tolist() for out in outs]
        if graphs:
            assert dec.runner.captures >= 1 and dec.runner.graphs
        else:  # the budgets bind (with every weight 1 the replay at C = 4 took other tokens in row 1, pad 4)
            assert all(any(v.budget_bound for v in out.stats.verify) for out in outs[1:])
    assert runs[False][0] == reference(target, ids, mask, 10).tolist()
    assert runs[True] == runs[False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_batched():
    """Batched verify passes replayed as CUDA graphs (one per (rows bucket, tree bucket), budgets as data)
    equal generate without a budget, and equal eager passes under a budget. Not run by this project's CI."""
    model = build("qwen3_moe")[0].cuda()
    ids, mask = left_padded([0, 4, 2])
    ids, mask = ids.cuda(), mask.cuda()
    want = reference(model, ids, mask, 12)
    runs = {}
    for graphs in (True, False):
        dec = msc.SpeculativeDecoder(model, drafter=msc.ModelDrafter(model), tree=msc.TreeSpec(6, 3, 2),
                                     compile=True, compile_options={"inner": "eager"}, cuda_graphs=graphs)
        runs[graphs] = [dec.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None, budget=c)
                        for c in (None, 4, 6)]
        if graphs:
            assert dec.runner.captures == len({s for out in runs[True] for s in out.stats.pass_shapes})
    # eager passes against generate first: a mismatch there is the batched path on this device, not the graphs
    assert runs[False][0].sequences.tolist() == want.tolist()
    for replayed, eager in zip(runs[True], runs[False]):
        assert replayed.sequences.tolist() == eager.sequences.tolist()
