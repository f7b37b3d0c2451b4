"""Sampling acceptance keeps the target's distribution: recursive rejection sampling over siblings
(accept.py) checked by counting, on synthetic trees and end to end on a tiny MoE with a small vocabulary.

Every test draws with a fixed seed, so a pass or failure is reproducible; the thresholds are chi-square
quantiles far in the tail (p < 1e-4) for a correct sampler."""

from __future__ import annotations

import collections

import pytest
import torch
import transformers

import moe_spec_compile as msc
from moe_spec_compile.speculative.accept import SamplingConfig, accept_sample, process_logits
from moe_spec_compile.speculative.tree import DraftTree

V = 6
# chi-square quantiles at p = 1e-4 by degrees of freedom (a correct sampler fails 1 in 10^4 seeds)
CHI2_TAIL = {4: 23.5, 5: 25.7, 7: 29.9, 11: 37.3}


def chi2(counts: list[int], probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the bins with expected count >= 5 (the rest pooled into one bin)."""
    n = sum(counts)
    exp = (probs.double() * n).tolist()
    stat, pool_o, pool_e, dof = 0.0, 0, 0.0, -1
    for o, e in zip(counts, exp):
        if e >= 5:
            stat += (o - e) ** 2 / e
            dof += 1
        else:
            pool_o, pool_e = pool_o + o, pool_e + e
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / max(pool_e, 1e-9)
        dof += 1
    return stat, dof


def _synthetic():
    """Root with children tokens 2, 0, 2 (a duplicate), node 1 (token 2) with children 1, 3."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6, V, generator=g) * 1.5  # one row
    tree = DraftTree.from_lists([([4, 2, 0, 2, 1, 3], [-1, 0, 0, 0, 1, 1])], "cpu")
    return tree, logits


@pytest.mark.parametrize("cfg", [SamplingConfig(True, 1.0), SamplingConfig(True, 0.7, top_p=0.8)],
                         ids=["t1", "t0.7-top_p0.8"])
def test_rejection_sampling_keeps_distribution(cfg):
    """First emitted token ~ p_root; given the first token is node 1's token, the second ~ p_node1."""
    tree, logits = _synthetic()
    probs = process_logits(logits, cfg)[0]
    live = torch.tensor([True])
    gen = torch.Generator().manual_seed(1)
    first, second = [0] * V, [0] * V
    trials = 12000
    for _ in range(trials):
        acc = accept_sample(tree, logits, cfg, live, gen)
        emitted = acc.tokens[0][1:] + [acc.bonus[0]]
        first[emitted[0]] += 1
        if emitted[0] == 2:  # node 1 (the first child with token 2) was accepted
            assert acc.paths[0][:2] == [0, 1]
            second[emitted[1]] += 1
    for counts, p in ((first, probs[0]), (second, probs[1])):
        stat, dof = chi2(counts, p)
        assert stat < CHI2_TAIL.get(dof, 40.0), (counts, p.tolist(), stat, dof)


def test_a_wrong_rule_is_caught():
    """The test has power: accepting every drafted child whenever p > 0 skews the first token."""
    tree, logits = _synthetic()
    probs = process_logits(logits, SamplingConfig(True))[0]
    counts = [0] * V
    gen = torch.Generator().manual_seed(2)
    for _ in range(3000):
        counts[2 if float(probs[0, 2]) > 0 else int(torch.multinomial(probs[0], 1, generator=gen))] += 1
    assert chi2(counts, probs[0])[0] > 1000


def test_top_p_matches_transformers():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    for top_p in (0.3, 0.9):
        ours = process_logits(logits, SamplingConfig(True, 0.8, top_p=top_p))
        warped = transformers.TopPLogitsWarper(top_p)(None, logits / 0.8)
        assert torch.allclose(ours, warped.softmax(-1), atol=1e-6)


def _tiny_pair(vocab: int):
    from moe_models import COMMON
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(**{**COMMON, "vocab_size": vocab}, intermediate_size=64, moe_intermediate_size=24,
                                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                                      norm_topk_prob=True, head_dim=12)
    target = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # a peaked but not degenerate next-token distribution
        target.lm_head.weight.mul_(6.0)
    dcfg = transformers.Qwen3Config(**{**COMMON, "vocab_size": vocab, "num_hidden_layers": 1}, intermediate_size=32,
                                    head_dim=12)
    draft = transformers.AutoModelForCausalLM.from_config(dcfg).eval()
    return target, draft


@pytest.mark.parametrize("tree", [2, msc.TreeSpec(4, 2, 2)], ids=["chain2", "tree4"])
def test_end_to_end_distribution(tree):
    vocab = 12
    target, draft = _tiny_pair(vocab)
    assert_sampling_keeps_distribution(target, msc.ModelDrafter(draft), tree, vocab)


def assert_sampling_keeps_distribution(target, drafter, tree, vocab: int) -> None:
    """Three sampled tokens after a fixed prompt (the first from the prefill, the others from one or
    two verify passes): the second given the most likely first token t1 ~ p(.|prompt, t1), and the
    third given (t1, t2) ~ p(.|prompt, t1, t2), t2 the most likely second token; exact distributions
    come from the target. Also used for other drafters (test_eagle3)."""
    prompt = torch.tensor([[3, 7, 1, 5]])
    cfg = dict(do_sample=True, temperature=1.0)
    with torch.no_grad():
        p1 = target(prompt).logits[0, -1].softmax(-1)
        t1 = int(p1.argmax())
        p2 = target(torch.cat([prompt, torch.tensor([[t1]])], 1)).logits[0, -1].softmax(-1)
        t2 = int(p2.argmax())
        p3 = target(torch.cat([prompt, torch.tensor([[t1, t2]])], 1)).logits[0, -1].softmax(-1)
    dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=tree)
    torch.manual_seed(4)
    second, third = [0] * vocab, [0] * vocab
    accepted = collections.Counter()
    for _ in range(500):
        out = dec.generate(prompt, max_new_tokens=3, eos_token_id=None, **cfg)
        a, b, c = out.sequences[0, 4:].tolist()
        accepted[out.stats.accepted_per_step[0]] += 1
        if a == t1:
            second[b] += 1
            if b == t2:
                third[c] += 1
    assert accepted[1] and len(accepted) > 1, accepted  # drafts were both accepted and rejected
    for counts, p in ((second, p2), (third, p3)):
        stat, dof = chi2(counts, p)
        assert stat < CHI2_TAIL.get(dof, 40.0), (counts, p.tolist(), stat, dof)
