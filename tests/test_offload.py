"""Expert offloading (moe_spec_compile.offload): outputs equal the in-memory model's, eagerly and compiled, exact and
under budgets; the pool never holds more than R experts; loads are counted once per missing expert; bad input is
refused with the model left as it was; decoding with an offloaded target equals greedy."""

import shutil

import pytest
import torch

import moe_spec_compile as msc
from moe_spec_compile import offload as offload_mod
from moe_spec_compile.offload import DiskStore, HostStore, Throttled

from moe_models import build, tiny_draft

IDS = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def expert_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("store", ["host", "disk"])
def test_offloaded_outputs_equal_the_model(family, store):
    model, e, k = build(family)
    want = logits(model)
    before = expert_params(model)
    handle = msc.offload_experts(model, resident=0.25, store=store)
    r = max(1, round(0.25 * e))
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n, _ in model.named_parameters())
    got = logits(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    logits(model, IDS.flip(-1))  # a second request: hits now
    stats = handle.stats()
    assert len(stats) == 2
    for s in stats.values():
        assert s["slots"] == r and s["max_resident"] <= r and s["resident"] <= r
        assert s["misses"] > 0 and s["hits"] > 0
        assert s["loaded_bytes"] == s["misses"] * next(iter(handle.blocks.values())).expert_bytes
    handle.restore()
    after = expert_params(model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=0)


@pytest.mark.parametrize("policy,inner", [("substitute", "eager"), ("truncate", "inductor")])
def test_offloaded_under_the_backend_with_budgets(policy, inner):
    model, e, k = build("qwen3_moe")
    ref = {}
    for c in (None, k + 1):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="moespec", options={"inner": inner, "budget": c, "policy": policy})
        ref[c] = logits(compiled)
    torch._dynamo.reset()
    handle = msc.offload_experts(model, resident=3, policy="lru")
    report = msc.explain(model, IDS)
    assert all(b.experts == "offloaded_experts (3 of 16 resident)" and b.rewritten for b in report.blocks)
    for c in (None, k + 1):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="moespec", options={"inner": inner, "budget": c, "policy": policy})
        before = {b: s["misses"] for b, s in handle.stats().items()}
        with msc.record_experts() as rec:
            got = logits(compiled)
        torch.testing.assert_close(got, ref[c], rtol=1e-5, atol=1e-5)
        if c is not None:  # a pass misses at most C experts per layer: the budget caps the loads
            for b, s in handle.stats().items():
                assert s["misses"] - before[b] <= c
            assert all(len(ev.experts) <= c for ev in rec.events)
    assert max(s["max_resident"] for s in handle.stats().values()) <= 3
    handle.restore()


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_prefer_resident_budgets_miss_less_and_exact_passes_do_not_change(inner):
    """prefer_resident(bonus): under a budget, A takes resident experts over ones that must load (two identical
    offloaded copies, the same passes: the preferring one misses fewer on the last); exact passes are untouched and
    the budget still holds; a bad bonus is refused."""
    import copy

    model, _e, k = build("qwen3_moe")
    twin = copy.deepcopy(model)
    c = k + 2
    handles = [msc.offload_experts(m, resident=c) for m in (model, twin)]
    with pytest.raises(ValueError, match="bonus"):
        for bad in (0, -1.0, float("inf"), True, "1"):
            with handles[0].prefer_resident(bad):
                pass
    x = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    for budget in (None, c):
        torch._dynamo.reset()
        compiled = [torch.compile(m, backend="moespec", options={"inner": inner, "budget": budget})
                    for m in (model, twin)]
        with torch.no_grad():
            for m in compiled:
                m(IDS[:1])
            before = [sum(s["misses"] for s in h.stats().values()) for h in handles]
            plain = compiled[0](x).logits
            with handles[1].prefer_resident(100.0), msc.record_experts() as rec:
                preferring = compiled[1](x).logits
        misses = [sum(s["misses"] for s in h.stats().values()) - b for h, b in zip(handles, before)]
        if budget is None:
            torch.testing.assert_close(preferring, plain, rtol=1e-5, atol=1e-5)
            assert misses[0] == misses[1]
        else:
            assert misses[1] < misses[0], misses
            assert all(len(ev.experts) <= c for ev in rec.events)
            assert torch.isfinite(preferring).all() and not torch.equal(preferring, plain)
    for h in handles:
        h.restore()


def test_throttled_store_takes_its_time_and_stays_exact():
    model, _e, _k = build("mixtral")
    want = logits(model)
    store = Throttled(HostStore(), bytes_per_s=50e6)  # 50 MB/s: a 46 kB expert takes about 1 ms
    handle = msc.offload_experts(model, resident=2, store=store)
    import time

    t0 = time.perf_counter()
    got = logits(model)
    seconds = time.perf_counter() - t0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    moved = sum(s["loaded_bytes"] for s in handle.stats().values())
    assert seconds >= moved / 50e6
    handle.restore()


def test_bad_input_is_refused_and_the_model_is_left_as_it_was(tmp_path, monkeypatch):
    model, e, _k = build("qwen3_moe")
    before = expert_params(model)
    for resident in (0, e + 1, 1.5, 0.0, True, "4", None):
        with pytest.raises(ValueError, match="resident"):
            msc.offload_experts(model, resident=resident)
    with pytest.raises(ValueError, match="policy"):
        msc.offload_experts(model, resident=2, policy="fifo")
    with pytest.raises(ValueError, match="store"):
        msc.offload_experts(model, resident=2, store="tape")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1))
    with pytest.raises(ValueError, match="needs .* GiB"):
        msc.offload_experts(model, resident=2, store=DiskStore(tmp_path))
    monkeypatch.undo()
    after = expert_params(model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    with pytest.raises(ValueError, match="no experts module"):
        msc.offload_experts(tiny_draft(), resident=2)
    gpt_oss, _e, _k = build("gpt_oss")
    with pytest.raises(ValueError, match="biases"):
        msc.offload_experts(gpt_oss, resident=2)
    handle = msc.offload_experts(model, resident=2)
    with pytest.raises(ValueError, match="offloaded already"):
        msc.offload_experts(model, resident=2)
    with pytest.raises(ValueError, match="cannot capture"):
        msc.SpeculativeDecoder(model, msc.NgramDrafter(), cuda_graphs=True)
    handle.restore()


@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_speculative_decoding_with_an_offloaded_target_equals_greedy(drafter):
    model, _e, k = build("qwen3_moe")
    with torch.no_grad():
        want = model.generate(IDS[:1], max_new_tokens=16, do_sample=False, min_new_tokens=16)
    handle = msc.offload_experts(model, resident=4)
    d = msc.NgramDrafter() if drafter == "ngram" else msc.ModelDrafter(tiny_draft())
    dec = msc.SpeculativeDecoder(model, d, tree=4, compile=True, compile_options={"inner": "eager"})
    got = dec.generate(IDS[:1], max_new_tokens=16, eos_token_id=None).sequences
    assert torch.equal(got, want)
    assert sum(s["misses"] for s in handle.stats().values()) > 0
    handle.restore()


def test_cache_policies_and_the_belady_bound():
    from moe_spec_compile.offload import SlotCache, belady_hits

    # a hot expert (0) every third pass between a stream of cold ones, 2 slots: LRU evicts it, LFU keeps it
    trace = [[0] if i % 3 == 0 else [1 + i] for i in range(60)]
    rates = {}
    for policy in ("lru", "lfu"):
        cache = SlotCache(2, policy)
        for needed in trace:
            waves = cache.plan(needed)
            assert all(len(w) <= 2 for w in waves) and len(cache.where) <= 2
        rates[policy] = cache.hits
    hits, misses = belady_hits(trace, 2)
    assert hits + misses == sum(len(n) for n in trace)
    assert rates["lru"] == 0 and rates["lfu"] >= 15
    assert hits >= rates["lfu"]
    # a pass needing more experts than slots runs in waves; every expert counted once
    cache = SlotCache(3, "lfu")
    waves = cache.plan(list(range(7)))
    assert [len(w) for w in waves] == [3, 3, 1] and cache.misses == 7 and len(cache.where) == 3
    g = torch.Generator().manual_seed(0)
    trace = [sorted(set(torch.randint(0, 16, (4,), generator=g).tolist())) for _ in range(200)]
    for policy in ("lru", "lfu"):
        cache = SlotCache(4, policy)
        for needed in trace:
            cache.plan(needed)
        assert belady_hits(trace, 4)[0] >= cache.hits


def test_draft_scores_rank_in_eviction_until_the_verify_pass():
    """"lfu+draft": an expert the drafting passes wanted outranks a more frequent one the draft did not ask for,
    through any drafting passes, until the next pass that is not drafting; "lfu" and "lru" ignore them."""
    from moe_spec_compile import offload
    from moe_spec_compile.offload import SlotCache

    def victim(policy, hint, drafting_between=False):
        cache = SlotCache(2, policy)
        for needed in ([0], [1], [0]):  # 0 used twice (decayed count 1.81), 1 once (0.9)
            cache.plan(needed)
        if hint:
            cache.hint({1: 1.0})
        if drafting_between:
            cache.plan([0, 1], drafting=True)  # a drafting pass keeps the hint
        cache.plan([2])
        return ({0, 1} - set(cache.where)).pop(), dict(cache.draft)

    assert victim("lfu+draft", hint=False) == (1, {})  # no draft scores: the rarer expert goes
    assert victim("lfu+draft", hint=True) == (0, {})  # the draft asked for 1: 0 goes; the verify pass cleared the hint
    assert victim("lfu+draft", hint=True, drafting_between=True)[0] == 0
    assert victim("lfu", hint=True)[0] == 1  # plain LFU ignores draft scores
    assert victim("lru", hint=True)[0] == 1  # LRU: the least recently used, draft or not
    assert offload.DRAFT_WEIGHT > 0


def test_self_drafter_passes_its_draft_scores_to_eviction(monkeypatch):
    """Under "lfu+draft" the self-drafter's drafting passes hand what their routers wanted to each layer's cache
    (counted on the device, normalized to the most wanted); under "lfu" nothing is collected."""
    model, _e, _k = build("qwen3_moe")
    handle = msc.offload_experts(model, resident=8)
    assert not msc.SelfDrafter(model).hints and not handle.collect_wanted
    handle.restore()
    handle = msc.offload_experts(model, resident=8, policy="lfu+draft")
    seen = []
    monkeypatch.setattr(offload_mod.SlotCache, "hint", lambda self, scores: seen.append(dict(scores)))
    dec = msc.SpeculativeDecoder(model, msc.SelfDrafter(model), tree=4)
    dec.generate(IDS[:1], max_new_tokens=12, eos_token_id=None)
    assert seen and all(scores and max(scores.values()) == 1.0 and min(scores.values()) > 0 for scores in seen)
    assert all(0 <= e < handle.blocks[next(iter(handle.blocks))].num_experts for scores in seen for e in scores)
    handle.restore()


def test_self_drafter_drafts_on_resident_experts_only_and_keeps_greedy():
    model, _e, k = build("qwen3_moe")
    with torch.no_grad():
        want = model.generate(IDS[:1], max_new_tokens=20, do_sample=False, min_new_tokens=20)
    with pytest.raises(ValueError, match="offload_experts"):
        msc.SelfDrafter(model)
    handle = msc.offload_experts(model, resident=8)
    loads_while_drafting = []

    class Probe(msc.SelfDrafter):
        def _run(self, *args, **kwargs):
            before = sum(b.loaded_bytes for b in handle.blocks.values())
            with msc.record_experts() as rec:
                out = super()._run(*args, **kwargs)
            loads_while_drafting.append(sum(b.loaded_bytes for b in handle.blocks.values()) - before)
            for ev in rec.events:  # every drafting pass chose among the resident experts only
                block = handle.by_block[ev.block]
                assert all(e in block.cache.where for e in ev.experts)
            return out

    for tree in (4, msc.TreeSpec(8, 3, 2)):
        dec = msc.SpeculativeDecoder(model, Probe(model, prefetch=False), tree=tree)
        got = dec.generate(IDS[:1], max_new_tokens=20, eos_token_id=None).sequences
        assert torch.equal(got, want)
    assert loads_while_drafting and not any(loads_while_drafting)
    handle.restore()
    small, _e, _k = build("qwen3_moe")
    handle = msc.offload_experts(small, resident=k - 1)
    with pytest.raises(ValueError, match="top-k"):
        msc.SelfDrafter(small)
    handle.restore()


def test_self_drafter_prefetches_what_the_verify_pass_needs():
    """With prefetch, the experts each drafting pass's router wanted load in a worker thread before the verify pass:
    greedy output unchanged, the pool never above R, and prefetched experts are used by verify passes."""
    model, _e, _k = build("qwen3_moe")
    with torch.no_grad():
        want = model.generate(IDS[:1], max_new_tokens=24, do_sample=False, min_new_tokens=24)
    handle = msc.offload_experts(model, resident=8)
    with pytest.raises(ValueError, match="prefetch"):
        msc.SelfDrafter(model, prefetch=1)
    dec = msc.SpeculativeDecoder(model, msc.SelfDrafter(model, prefetch=True), tree=4)
    got = dec.generate(IDS[:1], max_new_tokens=24, eos_token_id=None).sequences
    assert torch.equal(got, want)
    stats = handle.stats().values()
    assert all(s["max_resident"] <= 8 for s in stats)
    assert sum(s["prefetched"] for s in stats) > 0 and sum(s["prefetched_used"] for s in stats) > 0
    assert all(s["prefetched_used"] <= s["prefetched"] for s in stats)
    handle.restore()


def test_an_offloaded_copy_beside_the_in_memory_model():
    """The decoder's compiles skip dynamo's module guards; while an offload is live they keep them, so graphs traced
    for the in-memory model are never replayed on an offloaded copy of it (or back), whatever the order."""
    import copy

    model, _e, _k = build("qwen3_moe")
    with torch.no_grad():
        want = model.generate(IDS[:1], max_new_tokens=12, do_sample=False, min_new_tokens=12)
    opts = {"inner": "eager"}
    in_memory = msc.SpeculativeDecoder(model, msc.NgramDrafter(), tree=4, compile=True, compile_options=opts)
    twin = copy.deepcopy(model)
    handle = msc.offload_experts(twin, resident=4)
    offloaded = msc.SpeculativeDecoder(twin, msc.NgramDrafter(), tree=4, compile=True, compile_options=opts)
    for dec in (in_memory, offloaded, in_memory, offloaded):
        got = dec.generate(IDS[:1], max_new_tokens=12, eos_token_id=None).sequences
        assert torch.equal(got, want)
    handle.restore()
    assert torch.equal(in_memory.generate(IDS[:1], max_new_tokens=12, eos_token_id=None).sequences, want)


def test_padded_batch_with_an_offloaded_target_equals_in_memory():
    """A left-padded batch decoded over an offloaded target gives the in-memory decoder's tokens, row by row."""
    model, _e, _k = build("qwen3_moe")
    ids = IDS.clone()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1: 4 pad tokens on the left
    ids[1, :4] = 0
    want = msc.SpeculativeDecoder(model, msc.NgramDrafter(), tree=4).generate(
        ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None).sequences
    handle = msc.offload_experts(model, resident=4)
    got = msc.SpeculativeDecoder(model, msc.NgramDrafter(), tree=4).generate(
        ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None).sequences
    assert torch.equal(got, want)
    assert sum(s["misses"] for s in handle.stats().values()) > 0
    handle.restore()
