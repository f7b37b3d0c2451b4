"""Speculative decoding against plain references: the target's own greedy generate (budget None),
KV recomputed from scratch, and the budget recorded per verify pass.

Target: a tiny random Qwen3-MoE (tests/moe_models.py); drafts: a tiny dense Qwen3, the target itself
(every draft accepted, so long paths and overshoot get exercised) and n-gram lookup."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import moe_spec_compile as msc
from moe_spec_compile.speculative.accept import Acceptance
from moe_spec_compile.speculative.buckets import pick_bucket
from moe_spec_compile.speculative.tree import DraftTree, StaticTree, TreeSpec, ancestors, as_tree_shape

from moe_models import build, tiny_draft

STATIC = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]


@pytest.fixture(scope="module")
def target():
    return build("qwen3_moe")[0]


@pytest.fixture(scope="module")
def draft():
    return tiny_draft()


def reference(model, prompt, n, eos=None):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return out[0].tolist()


def make_drafter(kind, target, draft):
    return {"draft": lambda: msc.ModelDrafter(draft), "self": lambda: msc.ModelDrafter(target),
            "ngram": lambda: msc.NgramDrafter()}[kind]()


PROMPTS = [torch.tensor([[5, 17, 33, 2, 90, 41, 8]]), torch.tensor([[11]]),
           torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4, 5, 60, 61, 3, 4]])]


@pytest.mark.parametrize("kind", ["draft", "self", "ngram"])
@pytest.mark.parametrize("tree", [3, TreeSpec(8, 3, 2), STATIC], ids=["chain3", "dyn8-3-2", "static6"])
def test_greedy_equals_generate(target, draft, kind, tree):
    """Budget None, greedy: token for token the target's own generate, several prompts and lengths."""
    dec = msc.SpeculativeDecoder(target, drafter=make_drafter(kind, target, draft), tree=tree)
    for prompt, n in zip(PROMPTS, (24, 9, 17)):
        out = dec.generate(prompt, max_new_tokens=n, eos_token_id=None)
        assert out.sequences[0].tolist() == reference(target, prompt, n)
        assert out.stats.new_tokens == n
        if kind == "self":  # the draft is the target: whole paths get accepted
            assert out.stats.tokens_per_step > 1.5


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v3", "gpt_oss"])
def test_families(family):
    """Other families' attention and caches (DeepSeek-V3: MLA key/value dims; GPT-OSS: sliding layers,
    with more tokens than its window of 16)."""
    model = build(family)[0]
    prompt = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    dec = msc.SpeculativeDecoder(model, drafter=msc.ModelDrafter(model), tree=TreeSpec(6, 3, 2))
    assert dec.generate(prompt, max_new_tokens=20, eos_token_id=None).sequences[0].tolist() == \
        reference(model, prompt, 20)


@pytest.mark.parametrize("at", [0, 1, 4, 9])
def test_eos_and_max_new_tokens_exact(target, at):
    """EOS at generated position `at` (also inside an accepted path: the self-draft accepts whole
    chains) stops right after it, as generate does; max_new_tokens cuts overshooting paths."""
    prompt = PROMPTS[0]
    free = reference(target, prompt, 16)[7:]
    eos = free[at]
    want = reference(target, prompt, 16, eos=eos)
    dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(target), tree=5)
    assert dec.generate(prompt, max_new_tokens=16, eos_token_id=eos).sequences[0].tolist() == want
    for n in (1, 2, 3, 7):
        assert dec.generate(prompt, max_new_tokens=n, eos_token_id=None).sequences[0].tolist() == \
            prompt[0].tolist() + free[:n]


def test_kv_compaction_matches_recompute(target, draft):
    """After generation the compacted caches (target's and drafter's) hold the KV a fresh forward of
    the accepted sequence computes."""
    drafter = msc.ModelDrafter(draft)
    dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=TreeSpec(10, 4, 3))
    out = dec.generate(PROMPTS[2], max_new_tokens=20, eos_token_id=None)
    seq = out.sequences
    for model, cache in ((target, dec.cache), (draft, drafter.cache)):
        n = cache.length
        assert n >= seq.shape[1] - 2
        with torch.no_grad():
            ref = model(seq[:, :n], use_cache=True).past_key_values
        for i, layer in enumerate(cache.layers):
            assert torch.allclose(layer.keys[:, :, :n], ref.layers[i].keys, atol=1e-5)
            assert torch.allclose(layer.values[:, :, :n], ref.layers[i].values, atol=1e-5)


@pytest.fixture(scope="module")
def compiled(target):
    """The target compiled by the moespec backend (eager inner compiler: fast on the CPU)."""
    torch._dynamo.reset()
    return msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(target), tree=TreeSpec(8, 3, 2), compile=True,
                                  compile_options={"inner": "eager"})


def test_budget_bounds_every_verify_pass(target, compiled):
    """Each verify pass runs under exactly C (never rounded up to a bucket) and records at most C experts per
    MoE layer; None stays exact."""
    prompt = PROMPTS[0]
    assert compiled.generate(prompt, max_new_tokens=12, eos_token_id=None).sequences[0].tolist() == \
        reference(target, prompt, 12)
    for c in (4, 5, 8):
        stats = compiled.generate(prompt, max_new_tokens=12, eos_token_id=None, budget=c).stats
        assert stats.verify and all(v.budget == c for v in stats.verify)
        for v in stats.verify:
            assert len(v.experts_per_layer) == 2 and max(v.experts_per_layer.values()) <= c
            assert set(v.layer_budgets.values()) == {c}
        assert any(v.budget_bound for v in stats.verify)


def test_budget_switches_never_recompile(compiled):
    """A budget schedule switches budgets mid-generation without recompiling; a new tree size compiles its
    bucket once, and only once."""
    prompt = PROMPTS[0]
    compiled.generate(prompt, max_new_tokens=6, eos_token_id=None)  # the bucket of TreeSpec(8, 3, 2)
    frames = counters["frames"]["total"]
    out = compiled.generate(prompt, max_new_tokens=16, eos_token_id=None, budget=lambda step: [4, None, 12][step % 3])
    assert {b for _, b in out.stats.buckets} == {4, None, 12}
    assert counters["frames"]["total"] == frames
    for _ in range(2):
        out = compiled.generate(prompt, max_new_tokens=8, eos_token_id=None, tree=TreeSpec(20, 4, 3), budget=6)
    assert out.stats.buckets == [(21, 6)]  # the tree's own size: 20 nodes + the root
    assert counters["frames"]["total"] == frames + 1


def test_decoder_passes_skip_module_guards_and_refuse_a_mode_change(target):
    """The decoder's own compiled passes (buckets.compile_pass) carry no guards on module attributes (checking them
    cost up to 700 us a pass on the CPU): a module attribute changed after compiling is not seen (the guard that
    would have recompiled is gone), and the one attribute a user plausibly flips, train/eval mode, is refused."""
    from moe_spec_compile.speculative.buckets import compile_pass

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = 2.0

        def forward(self, x):
            return x * self.scale

    x = torch.randn(3)
    for guarded in (False, True):
        mod = Scaled()
        run = torch.compile(mod, backend="eager") if guarded else compile_pass(mod, "eager")
        assert torch.equal(run(x), x * 2)
        mod.scale = 3.0
        assert torch.equal(run(x), x * (3 if guarded else 2))  # plain torch.compile re-guards; ours does not
    was_training = target.training
    try:
        target.eval()
        dec = msc.SpeculativeDecoder(target, tree=2, compile=True, compile_options={"inner": "eager"})
        dec.generate(PROMPTS[0], max_new_tokens=3, eos_token_id=None)
        target.train()
        with pytest.raises(ValueError, match="train mode after this decoder compiled"):
            dec.generate(PROMPTS[0], max_new_tokens=3, eos_token_id=None)
        target.eval()
        assert dec.generate(PROMPTS[0], max_new_tokens=3, eos_token_id=None).sequences[0].tolist() == \
            reference(target, PROMPTS[0], 3)
        target.train()  # a decoder that compiled nothing follows the model's mode
        msc.SpeculativeDecoder(target, tree=2).generate(PROMPTS[0], max_new_tokens=2, eos_token_id=None)
    finally:
        target.train(was_training)


def test_two_instances_and_changed_weights_through_inductor():
    """Without module guards (compile_pass), the default path (compile=True, inductor, a compiled drafter) still
    keeps two instances of one model class apart, and follows weight values changed in place after compiling:
    each decoder equals its own model's generate."""
    models = [build("qwen3_moe")[0].eval() for _ in range(2)]
    with torch.no_grad():
        for p in models[1].parameters():
            p.mul_(1.5)
    prompt = PROMPTS[0]
    decs = [msc.SpeculativeDecoder(m, drafter=msc.ModelDrafter(m), tree=3, compile=True) for m in models]
    refs = [reference(m, prompt, 8) for m in models]
    assert refs[0] != refs[1]
    for _ in range(2):
        assert [d.generate(prompt, max_new_tokens=8, eos_token_id=None).sequences[0].tolist() for d in decs] == refs
    with torch.no_grad():
        for p in models[0].parameters():
            p.mul_(0.7)
    ref = reference(models[0], prompt, 8)
    assert ref != refs[0]
    assert decs[0].generate(prompt, max_new_tokens=8, eos_token_id=None).sequences[0].tolist() == ref


def test_compile_pass_keeps_models_of_one_class_apart():
    """Without module guards nothing in a guard tells two models of one class apart; compile_pass gives each
    compilation a frame of its own, so a draft and a target of one family (different depths and widths here) each
    run their own graph, as a compiled function does."""
    from moe_spec_compile.speculative.buckets import compile_pass

    class Stack(torch.nn.Module):
        def __init__(self, n, width):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(n))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    torch.manual_seed(0)
    one, three, wide = Stack(1, 4), Stack(3, 4), Stack(1, 6)
    with torch.no_grad():
        for model in (one, three, wide):
            x = torch.randn(2, model.layers[0].in_features)
            assert torch.equal(compile_pass(model, "eager")(x), model(x))
        x = torch.randn(2, 4)
        twice = compile_pass(lambda m, v: m(m(v)), "eager")
        assert torch.equal(twice(one, x), one(one(x)))


def test_cache_goes_in_by_the_models_own_keyword(target, draft):
    """kv.forward hands the TreeCache over by the keyword the model's forward declares (transformers renamed
    past_key_values to cache and warns on the old name), so decoding raises no deprecation warning for it."""
    import inspect
    import warnings

    from moe_spec_compile.speculative.kv import cache_keyword

    for model in (target, draft):
        params = inspect.signature(type(model).forward).parameters
        assert cache_keyword(model) == ("cache" if "cache" in params else "past_key_values")

    class Own(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    assert cache_keyword(Own()) == "past_key_values"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=3).generate(
            PROMPTS[0], max_new_tokens=5, eos_token_id=None)
    assert out.sequences[0].tolist() == reference(target, PROMPTS[0], 5)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_stats(target, draft):
    dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=3)
    stats = dec.generate(PROMPTS[0], max_new_tokens=10, eos_token_id=None).stats
    assert stats.steps == len(stats.accepted_per_step) == len(stats.verify)
    assert 1 <= stats.tokens_per_step <= 4
    assert sum(stats.accepted_per_step) >= 9
    s = stats.summary()
    assert s["time_s"]["verify"] > 0 and s["time_s"]["draft"] > 0 and s["buckets"] == [(4, None)]


def test_tree_shapes_and_buckets():
    assert as_tree_shape(4) == TreeSpec(4, 4, 1)
    assert TreeSpec(32, 5, 4).max_nodes == 32 and TreeSpec(100, 2, 3).max_nodes == 3 + 9
    assert StaticTree([(0, 1)]).paths == ((0,), (0, 1)) and StaticTree([(0, 1), (1,)]).parents() == [-1, 0, 0, 1]
    with pytest.raises(ValueError):
        TreeSpec(4, 0, 2)
    parents = torch.tensor([[-1, 0, 0, 1, 3]])
    anc = ancestors(parents, 3)[0]
    assert anc[4].tolist() == [True, True, False, True, True] and anc[2].tolist() == [True, False, True, False, False]
    assert [pick_bucket(n, (1, 4, 8)) for n in (1, 3, 8, 9)] == [1, 4, 8, 9] and pick_bucket(None, (4,)) is None


def test_ngram_drafter_proposes_continuations():
    d = msc.NgramDrafter(max_ngram=2)
    d.start(torch.tensor([[1, 2, 3, 4, 9, 1, 2, 5]]), [0], 64)
    tree = d.draft([1], TreeSpec(6, 3, 2), [True])  # context ... 5, 1 -> "1" followed by 2 twice, then 3 4 / 5 (root)
    assert tree.tokens[0].tolist()[:3] == [1, 2, 5] or tree.tokens[0].tolist()[:3] == [1, 2, 3]
    assert tree.parents[0].tolist()[1] == 0 and tree.size <= 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_equal_eager():
    model = build("qwen3_moe")[0].cuda()
    prompt = PROMPTS[0].cuda()
    """Graph replay equals the model's generate (the moespec ops run device-side Triton kernels, which
    capture; transformers' own experts code may sync to the host). Not run by this project's CI."""
    dec = msc.SpeculativeDecoder(model, drafter=msc.ModelDrafter(model), tree=TreeSpec(8, 3, 2), cuda_graphs=True,
                                 compile=True, compile_options={"inner": "eager"})
    for _ in range(2):
        assert dec.generate(prompt, max_new_tokens=16, eos_token_id=None).sequences[0].tolist() == \
            reference(model, prompt, 16)
    assert dec.runner.captures == 1
    # pass size 9: the 8-node tree and its root, a size of its own (the decoder adds each shape's full size)
    assert dec.generate(prompt, max_new_tokens=16, eos_token_id=None, budget=4).stats.buckets == [(9, 4)]
    assert dec.runner.captures == 1  # one graph per tree-size bucket serves every budget


def test_fastest_exact_keeps_the_faster_path():
    """Exact one-token passes alternate between the two paths (warm-up, then timed), then keep the faster."""
    from moe_spec_compile.speculative.buckets import FastestExact

    now = [0.0]
    cost = {"moespec": 3.0, "plain": 1.0}

    def path(name):
        def run(*args):
            now[0] += cost[name]
            return name
        return run

    fe = FastestExact(path("moespec"), path("plain"), lambda: now[0])
    one, eight = torch.zeros(1, 1), torch.zeros(1, 8)  # pass shapes (rows, tokens)
    ran = [fe(None, one, None, None, None) for _ in range(2 * (fe.WARM + fe.TIMED))]
    assert ran[:2] == ["moespec", "plain"] and ran.count("moespec") == ran.count("plain") and fe.last == ran[-1]
    assert fe.choice == "plain" and fe(None, one, None, None, None) == "plain" and fe.settled(1) and not fe.settled(8)
    cost.update(moespec=0.5)  # once chosen the choice stays (no re-measuring mid-request)
    assert fe(None, one, None, None, None) == "plain"
    # each pass size is measured on its own: at 8 tokens the moespec path is now the faster
    ran = [fe(None, eight, None, None, None) for _ in range(2 * (fe.WARM + fe.TIMED))]
    assert ran.count("moespec") == ran.count("plain") and fe.choices == {(1, 1): "plain", (1, 8): "moespec"}
    assert fe(None, eight, None, None, None) == "moespec" and fe(None, one, None, None, None) == "plain"
    # more paths: calls go round all of them, the fastest is kept
    cost.update(batched=2.0)
    fe = FastestExact(path("moespec"), path("plain"), lambda: now[0], batched=path("batched"))
    ran = [fe(None, one, None, None, None) for _ in range(3 * (fe.WARM + fe.TIMED))]
    assert ran[:3] == ["moespec", "plain", "batched"] and {ran.count(p) for p in cost} == {fe.WARM + fe.TIMED}
    assert fe.choice == "moespec" and fe(None, one, None, None, None) == "moespec"


def test_autoregressive_steps_take_the_faster_exact_path(target, compiled):
    """tree=0 on a moespec-compiled target: every step exact, tokens equal generate's, whichever path is kept."""
    dec = msc.SpeculativeDecoder(target, tree=0, compile=True, compile_options={"inner": "eager"})
    prompt = PROMPTS[0]
    out = dec.generate(prompt, max_new_tokens=16, eos_token_id=None)
    assert out.sequences[0].tolist() == reference(target, prompt, 16)
    assert dec.exact_one.choice in ("moespec", "plain")
    assert {v.path for v in out.stats.verify[-3:]} == {dec.exact_one.choice}
    assert {v.path for v in out.stats.verify} == {"moespec", "plain"}  # measuring ran both, each labelled
    budgeted = dec.generate(prompt, max_new_tokens=6, eos_token_id=None, budget=4).stats.verify
    assert all(v.path == "moespec" and max(v.experts_per_layer.values()) <= 4 for v in budgeted)
    rows = torch.cat([prompt, prompt.flip(1)])  # a batch: its own pass shape (2, 1), measured on its own
    out = dec.generate(rows, attention_mask=torch.ones_like(rows), max_new_tokens=16, eos_token_id=None)
    assert out.sequences.tolist() == [reference(target, r[None], 16) for r in rows]
    assert dec.exact_one.settled((2, 1)) and {v.path for v in out.stats.verify} == {"moespec", "plain"}


def test_exact_speculation_takes_the_faster_exact_path_per_pass_size(target, draft):
    """Inner inductor, no expert statistics: exact verify passes of every size may run on the unmodified model
    compiled by inductor (measured per pass size, each pass labelled); the tokens stay the target's greedy
    output; a budgeted pass always runs in the moespec graph, under its budget; collect_expert_stats=True keeps
    passes of N > 1 in the moespec graph, which counts them; the default records what runs there and moves
    no pass. A chain of 4 verifies 5 tokens (its own pass size), not 8."""
    torch._dynamo.reset()
    prompt = PROMPTS[0]
    want = reference(target, prompt, 24)
    dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=4, compile=True,
                                 compile_options={"inner": "inductor"}, collect_expert_stats=False)
    assert dec.plain_target is not dec.eager_target and dec.plain_target._orig_mod is target
    out = dec.generate(prompt, max_new_tokens=24, eos_token_id=None)
    assert out.sequences[0].tolist() == want
    assert {v.bucket for v in out.stats.verify} == {5}  # the chain's own size: no padding to 8
    # every exact path measured at N=5: the moespec graph, the plain target, the plain target with batched_mm experts
    assert {v.path for v in out.stats.verify if v.bucket == 5} == {"moespec", "plain", "batched_mm"}
    assert target.config._experts_implementation == "grouped_mm"  # switched only inside the batched_mm passes
    assert dec.exact_one.settled(5) and {v.path for v in out.stats.verify[-2:]} == {dec.exact_one.choices[(1, 5)]}
    again = dec.generate(prompt, max_new_tokens=24, eos_token_id=None)
    assert again.sequences[0].tolist() == want
    assert {v.path for v in again.stats.verify} == {dec.exact_one.choices[(1, 5)]}
    budgeted = dec.generate(prompt, max_new_tokens=8, eos_token_id=None, budget=3).stats.verify
    assert budgeted and all(v.path == "moespec" and v.budget == 3 for v in budgeted)
    counting = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=4, compile=True,
                                      compile_options={"inner": "inductor"}, collect_expert_stats=True)
    stats = counting.generate(prompt, max_new_tokens=8, eos_token_id=None).stats.verify
    assert all(v.path == "moespec" and v.experts_per_layer for v in stats)
    assert dec.exact_choice(5) and counting.exact_choice(1) and not counting.exact_choice(5)
    default = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=4, compile=True,
                                     compile_options={"inner": "inductor"})  # records, reroutes nothing
    out = default.generate(prompt, max_new_tokens=12, eos_token_id=None, budget=3)
    assert out.stats.verify and all(v.path == "moespec" and v.experts_per_layer for v in out.stats.verify)
    assert default.exact_choice(5) and default.records_experts()
    with pytest.raises(ValueError, match="collect_expert_stats must be"):
        msc.SpeculativeDecoder(target, tree=4, collect_expert_stats="yes")
    # settle_exact measures a pass size that has not been met yet, and runs nothing once it has
    tree = DraftTree.from_lists([([5, 6, 7], [-1, 0, 1])], prompt.device)
    assert not dec.exact_one.settled(4) and dec.settle_exact(tree) > 0 and dec.exact_one.settled(4)
    assert dec.settle_exact(tree) == 0 and counting.settle_exact(tree) == 0
    # an inner eager graph keeps the eager model as its plain path (one-token passes only)
    eager = msc.SpeculativeDecoder(target, tree=4, compile=True, compile_options={"inner": "eager"},
                                   collect_expert_stats=False)
    assert eager.plain_target is target and set(eager.exact_one.paths) == {"moespec", "plain"}


def test_batched_experts_path_only_for_grouped_mm_experts():
    """The batched_mm exact path is offered where the model's experts dispatch grouped_mm, runs with batched_mm
    switched on only around its own passes (restored when a pass raises), and is not offered for other experts
    implementations (the user's choice of eager experts stays theirs)."""
    from moe_spec_compile.speculative import decoder as dec_mod

    grouped, _, _ = build("qwen3_moe", "grouped_mm")
    configs = dec_mod._experts_configs(grouped)
    assert configs == [grouped.config]
    with pytest.raises(RuntimeError, match="inside"):
        with dec_mod._experts_implementation(configs, "batched_mm"):
            assert grouped.model.layers[0].mlp.experts.config._experts_implementation == "batched_mm"
            raise RuntimeError("inside")
    assert grouped.config._experts_implementation == "grouped_mm"
    dec = msc.SpeculativeDecoder(grouped, tree=0, compile=True, compile_options={"inner": "inductor"})
    assert set(dec.exact_one.paths) == {"moespec", "plain", "batched_mm"}
    eager, _, _ = build("qwen3_moe", "eager")
    assert dec_mod._experts_configs(eager) == []
    dec = msc.SpeculativeDecoder(eager, tree=0, compile=True, compile_options={"inner": "inductor"})
    assert set(dec.exact_one.paths) == {"moespec", "plain"}


def test_chain_acceptance_equals_the_general_acceptance():
    """A tree flagged as a chain takes the acceptance without the ancestor walk: on random chains whose drafts the
    target agrees with up to every depth (none, some, all), every field equals the general path's, and the chain's
    ancestor matrix is the one the parent walk gives."""
    from moe_spec_compile.speculative.accept import accept_greedy

    g = torch.Generator().manual_seed(0)
    for n, r, agree in [(1 + d, 1, a) for d in (1, 3, 5) for a in range(d + 1)] + [(5, 3, 2)]:
        logits = torch.randn(r, n, 50, generator=g)
        target = logits.argmax(-1)
        tokens = torch.randint(0, 50, (r, n), generator=g)
        tokens[:, 1 : agree + 1] = target[:, :agree]  # the first `agree` drafts are what the target would emit
        tokens[:, agree + 1 :] = (target[:, agree : n - 1] + 1) % 50  # the rest disagree
        parents, depth = torch.arange(-1, n - 1).expand(r, n), torch.arange(n).expand(r, n)
        payload = torch.randint(-1, 9, (r, n), generator=g)
        chain = DraftTree(tokens, parents, depth, payload=payload, chain=True)
        general = DraftTree(tokens, parents, depth, payload=payload)
        anc = ancestors(parents, n)
        assert torch.equal(ancestors(parents, n, chain=True), anc)
        fast, ref = accept_greedy(chain, logits, anc, None), accept_greedy(general, logits, anc, None)
        assert fast.paths == ref.paths and fast.paths[0] == list(range(agree + 1))
        assert (fast.tokens, fast.bonus, fast.payload, fast.nodes) == (ref.tokens, ref.bonus, ref.payload, ref.nodes)
        for name in ("on_path", "best", "order", "length"):
            assert torch.equal(getattr(fast, name), getattr(ref, name)), name


@torch.no_grad()
def test_chain_drafting_path_equals_the_tree_path(draft):
    """ModelDrafter drafts a chain (TreeSpec(K, K, 1)) as causal one-token steps: the same tokens, parents, depths,
    path log-probs and fed ids as the general tree code on the same state, step after step, with accepted prefixes
    of every length (the chain's fed nodes are already in place: accept() copies nothing)."""
    prompt = PROMPTS[0]
    fast, general = msc.ModelDrafter(draft), msc.ModelDrafter(draft)
    for d in (fast, general):
        d.start(prompt, [0], 64)
    root, spec = 7, TreeSpec(4, 4, 1)  # the prompt is fed by start(); the root is the token after it
    committed = prompt[0].tolist() + [root]
    for accepted in (0, 4, 2, 1, 3):
        a = fast.draft([root], spec, [True])
        want = torch.log_softmax(draft(torch.tensor([committed])).logits[0, -1].float(), -1)  # the KV cache is right
        assert int(a.tokens[0, 1]) == int(want.argmax()) and abs(float(a.logprob[0, 1]) - float(want.max())) < 1e-4
        logp = general._first_feed([root], [True])  # draft() minus the chain shortcut
        b = general._draft_dynamic(torch.tensor([root]), logp, spec)
        for name in ("tokens", "parents", "depth", "payload"):
            assert getattr(a, name).tolist() == getattr(b, name).tolist(), name
        torch.testing.assert_close(a.logprob, b.logprob)
        path = list(range(accepted + 1))
        tokens = a.tokens[0, : accepted + 1].tolist() + [11 + accepted]  # the path, then a bonus
        for d, t in ((fast, a), (general, b)):
            d.accept(Acceptance(None, None, None, None, [path], [tokens[:-1]], [tokens[-1]],
                                [t.payload[0, path].tolist()]), [True])
        assert fast.cache.length == general.cache.length
        committed += tokens[1:]
        root = tokens[-1]


def test_compiled_drafter_proposes_what_the_eager_one_does(target, draft):
    """ModelDrafter(compile=True): the draft's forward through inductor (dynamic shapes); the same trees as the
    eager drafter, and the decoder's output stays the target's greedy output."""
    torch._dynamo.reset()
    eager, compiled = msc.ModelDrafter(draft), msc.ModelDrafter(draft, compile=True)
    assert compiled.compiled and not eager.compiled
    prompt = PROMPTS[0]
    trees = []
    for d in (eager, compiled):
        d.start(prompt, [0], 64)
        tree = d.draft([int(prompt[0, -1])], TreeSpec(8, 3, 2), [True])
        trees.append((tree.tokens.tolist(), tree.parents.tolist()))
    assert trees[0] == trees[1]
    dec = msc.SpeculativeDecoder(target, drafter=compiled, tree=TreeSpec(8, 3, 2))
    assert dec.generate(prompt, max_new_tokens=12, eos_token_id=None).sequences[0].tolist() == \
        reference(target, prompt, 12)
    late = msc.ModelDrafter(draft)  # compiled between start() and draft(): the next pass uses the compiled forward
    late.start(prompt, [0], 64)
    late.compile()
    tree = late.draft([int(prompt[0, -1])], TreeSpec(8, 3, 2), [True])
    assert (tree.tokens.tolist(), tree.parents.tolist()) == trees[0]
    rows = torch.cat([prompt, prompt.flip(1)])
    chains = []  # a compiled chain's steps run as one graph (_chain_steps): the same chain, log-probs included
    for d in (eager, compiled):
        d.start(rows, [0, 3], 64)  # row 1 left-padded by 3
        tree = d.draft(rows[:, -1].tolist(), TreeSpec(4, 4, 1), [True, True])
        chains.append((tree.tokens, tree.logprob))
    assert compiled._chain_fn is not None and eager._chain_fn is None
    assert torch.equal(chains[0][0], chains[1][0])
    torch.testing.assert_close(chains[0][1], chains[1][1], rtol=1e-4, atol=1e-4)
    # batches draft through the compiled forward too
    out = dec.generate(rows, attention_mask=torch.ones_like(rows), max_new_tokens=8, eos_token_id=None)
    assert out.sequences.tolist() == [reference(target, r[None], 8) for r in rows]
    with pytest.raises(ValueError, match="compile must be a bool"):
        msc.ModelDrafter(draft, compile="yes")
    with pytest.raises(ValueError, match="cuda_graphs must be None or a bool"):
        msc.ModelDrafter(draft, cuda_graphs="yes")
    assert not compiled.cuda_graphs and not msc.ModelDrafter(draft, cuda_graphs=True).cuda_graphs  # CPU: never


@pytest.mark.parametrize("tree,do_sample", [(TreeSpec(8, 3, 2), False), (STATIC, False), (3, False),
                                            (TreeSpec(8, 3, 2), True)], ids=["dyn", "static", "chain", "sampled"])
def test_one_host_read_per_step(monkeypatch, target, draft, tree, do_sample):
    """The decode loop's own code (decoder, drafter, acceptance) reads the device once per greedy step: the
    acceptance decision, which also carries the drafter's per-node data (DraftTree.payload). Sampling reads twice
    (the tree's probabilities, then the bonus). Counted at the call sites inside moe_spec_compile.speculative."""
    import sys

    reads = []

    def counting(name):
        orig = getattr(torch.Tensor, name)

        def read(self, *a, **kw):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("moe_spec_compile.speculative"):
                reads.append(name)
            return orig(self, *a, **kw)
        return read

    dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=tree)
    prompt = PROMPTS[0]
    want = reference(target, prompt, 10)
    steps = []
    step = dec._step

    def counted_step(*a, **kw):
        before = len(reads)
        out = step(*a, **kw)
        steps.append(len(reads) - before)
        return out

    monkeypatch.setattr(dec, "_step", counted_step)
    for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    out = dec.generate(prompt, max_new_tokens=10, eos_token_id=None, do_sample=do_sample,
                       generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert steps and out.stats.steps == len(steps)
    assert steps == [2 if do_sample else 1] * len(steps), steps
    if not do_sample:
        assert out.sequences[0].tolist() == want


def test_pass_inputs_live_in_preallocated_buffers(monkeypatch, target, draft):
    """Every pass of the decode loop (verify passes, the drafter's levels) gets its mask, and a verify pass its
    tokens, positions and write slots, from buffers allocated once per pass size and rewritten in place; the output
    stays the target's greedy output."""
    from moe_spec_compile.speculative import buckets, drafters

    seen: dict[tuple[str, int], set] = {}
    dec = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=TreeSpec(8, 3, 2))

    def recorder(fwd):
        def run(model, cache, tokens, positions, mask, slots, *args):
            who = "verify" if cache is dec.cache else "draft"
            ptrs = (mask.data_ptr(),) + ((tokens.data_ptr(), positions.data_ptr(), slots.data_ptr())
                                         if who == "verify" else ())
            seen.setdefault((who, *tokens.shape), set()).add(ptrs)
            return fwd(model, cache, tokens, positions, mask, slots, *args)
        return run

    monkeypatch.setattr(buckets, "forward", recorder(buckets.forward))
    monkeypatch.setattr(drafters, "forward", recorder(drafters.forward))
    prompt = PROMPTS[0]
    out = dec.generate(prompt, max_new_tokens=16, eos_token_id=None)
    assert out.sequences[0].tolist() == reference(target, prompt, 16)
    assert out.stats.steps >= 3
    short = prompt[:, 1:]  # an eager chain's steps too (a prompt of another length: prompts' masks are fresh)
    out = dec.generate(short, max_new_tokens=12, eos_token_id=None, tree=4)
    assert out.sequences[0].tolist() == reference(target, short, 12)
    rows = torch.cat([prompt, prompt.flip(1)])  # a batch: buffers of its own pass shapes, allocated once too
    out = dec.generate(rows, attention_mask=torch.ones_like(rows), max_new_tokens=16, eos_token_id=None)
    assert out.sequences.tolist() == [reference(target, r[None], 16) for r in rows]
    assert any(k[:2] == ("verify", 1) for k in seen) and any(k[:2] == ("verify", 2) for k in seen)
    assert any(k[0] == "draft" and k[1:] == (1, 2) for k in seen) and any(k[:2] == ("draft", 2) for k in seen)
    assert all(len(v) == 1 for v in seen.values()), seen


@pytest.mark.parametrize("layers", [None, ["sliding_attention", "full_attention"]])
def test_causal_masks_equal_tree_masks_of_a_chain(layers):
    """Masks.causal (device ops only: a drafter's first feed, a compiled chain's feed and steps) equals Masks.tree
    (tree_mask from host ints) with a lower-triangular ancestor matrix, for every feed width, rows of different
    padding, a feed that re-feeds padding slots, and a sliding window alone or mixed with full attention layers
    (a dict of masks)."""
    from types import SimpleNamespace

    from moe_spec_compile.speculative.kv import Masks

    model = torch.nn.Linear(2, 2)
    for window in (None, 3):
        model.config = SimpleNamespace(sliding_window=window, layer_types=layers if window else None)
        masks = Masks(model, 16)
        pad, first = [0, 4, 2], [5, 2, 9]  # row 1's feed starts in its padding
        for n in (1, 3, 5):
            anc = torch.ones(n, n, dtype=torch.bool).tril().expand(3, n, n)
            pos = torch.tensor([f - p for f, p in zip(first, pad)])[:, None] + torch.arange(n)
            want = masks.tree(anc, first, pad, pos, pos, buffered=False)
            want = {k: v.clone() for k, v in want.items()} if isinstance(want, dict) else want.clone()
            for buffered in (False, True):  # a fresh tensor, or written into Masks' (R, n) buffers
                got = masks.causal(torch.tensor(first), torch.tensor(pad), n, buffered)
                for w, g in (zip(want.values(), got.values()) if isinstance(want, dict) else [(want, got)]):
                    assert torch.equal(w, g), (window, n, buffered)
