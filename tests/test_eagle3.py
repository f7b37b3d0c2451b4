"""The EAGLE-3 head: checkpoints in each published format load and compute what a plain-torch reference of the
head computes; the KV-cache path equals the full pass; bad checkpoints are refused naming the field; the aux layer
conventions; the shipped head for the bundled target.

Shapes are tiny (hidden 32, 4 / 2 heads of 8, draft vocabulary 40 of 64) and the weights random and non-zero, so
every norm, projection and the RoPE matter to the numbers compared.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import save_file

from moe_spec_compile.eagle3 import Eagle3Config, Eagle3Head, default_aux_layer_ids, target_features

H, HEADS, KV, D, INTER, V, VD, L = 32, 4, 2, 8, 48, 64, 40, 8  # head hidden = the target's hidden
EPS, THETA = 1e-5, 500.0


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=V, hidden_size=H, intermediate_size=64, moe_intermediate_size=16,
                                      num_hidden_layers=L, num_attention_heads=HEADS, num_key_value_heads=KV,
                                      head_dim=D, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                                      mlp_only_layers=[], max_position_embeddings=128, tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _weights(seed: int, embed: bool, fc_bias: bool = False) -> dict[str, torch.Tensor]:
    """Random non-zero weights under the SpecForge names (norm weights near 1, not 1)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.2: torch.randn(*s, generator=g) * scale
    w = {"fc.weight": r(H, 3 * H), "norm.weight": 1 + r(H, scale=0.1), "lm_head.weight": r(VD, H),
         "midlayer.self_attn.q_proj.weight": r(HEADS * D, 2 * H), "midlayer.self_attn.k_proj.weight": r(KV * D, 2 * H),
         "midlayer.self_attn.v_proj.weight": r(KV * D, 2 * H), "midlayer.self_attn.o_proj.weight": r(H, HEADS * D),
         "midlayer.mlp.gate_proj.weight": r(INTER, H), "midlayer.mlp.up_proj.weight": r(INTER, H),
         "midlayer.mlp.down_proj.weight": r(H, INTER)}
    for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        w[f"midlayer.{n}.weight"] = 1 + r(H, scale=0.1)
    keep = torch.randperm(V, generator=g)[:VD].sort().values  # the draft vocabulary, ascending target ids
    w["d2t"] = keep - torch.arange(VD)
    w["t2d"] = torch.zeros(V, dtype=torch.bool)
    w["t2d"][keep] = True
    if embed:
        w["embed_tokens.weight"] = r(V, H, scale=1.0)
    if fc_bias:
        w["fc.bias"] = r(H)
    return w


def _layer_config(**over) -> dict:
    c = {"hidden_size": H, "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV,
         "head_dim": D, "num_hidden_layers": 1, "rms_norm_eps": EPS, "rope_theta": THETA, "vocab_size": V,
         "hidden_act": "silu", "model_type": "llama"}
    return {**c, **over}


def write_specforge(path, w, fmt="safetensors", aux_ids=None, **over):
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": VD, "target_hidden_size": H,
           **_layer_config()}
    if aux_ids is not None:
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux_ids)}
    cfg.update(over)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if fmt == "bin":
        torch.save(w, path / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in w.items()}, str(path / "model.safetensors"))
    return path


def write_speculators(path, w, norm_before_residual=True, aux_ids=None):
    """speculators' names: the layer is layers.0.*, plus its training-only verifier copies (ignored on load)."""
    state = {k.replace("midlayer.", "layers.0."): v for k, v in w.items()}
    state["verifier_norm.weight"] = torch.ones(H)
    state["verifier_lm_head.weight"] = torch.zeros(V, H)
    cfg = {"speculators_model_type": "eagle3", "architectures": ["Eagle3Speculator"], "draft_vocab_size": VD,
           "norm_before_residual": norm_before_residual, "target_hidden_size": None,
           "transformer_layer_config": _layer_config(), "speculators_config": {"algorithm": "eagle3"}}
    if aux_ids is not None:
        cfg["eagle_aux_hidden_state_layer_ids"] = list(aux_ids)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def reference_step(w, embedding, input_ids, aux, positions, norm_before_residual=False, feats=None):
    """The head's forward written out in plain torch (no cache, causal): (draft logits, next features). feats
    [B, n, H]: the features after fc (the head's own, for drafted tokens), instead of aux."""
    rms = lambda x, g: g * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    lin = lambda x, name: x @ w[name].T
    e = embedding[input_ids]  # [B, n, H]
    h = feats if feats is not None else lin(aux, "fc.weight") + (w["fc.bias"] if "fc.bias" in w else 0)
    normed = rms(h, w["midlayer.hidden_norm.weight"])
    residual = normed if norm_before_residual else h
    x = torch.cat([rms(e, w["midlayer.input_layernorm.weight"]), normed], dim=-1)
    b, n, _ = x.shape
    q = lin(x, "midlayer.self_attn.q_proj.weight").view(b, n, HEADS, D)
    k = lin(x, "midlayer.self_attn.k_proj.weight").view(b, n, KV, D)
    v = lin(x, "midlayer.self_attn.v_proj.weight").view(b, n, KV, D)

    def rotate(t):  # pairs (i, i + D/2) turned by position * THETA^(-2i/D)
        out = torch.empty_like(t)
        for i in range(D // 2):
            ang = positions[:, :, None].double() * THETA ** (-2 * i / D)
            c, s = torch.cos(ang).to(t.dtype), torch.sin(ang).to(t.dtype)
            out[..., i] = t[..., i] * c - t[..., i + D // 2] * s
            out[..., i + D // 2] = t[..., i + D // 2] * c + t[..., i] * s
        return out

    q, k = rotate(q), rotate(k)
    heads = []
    for hq in range(HEADS):
        hk = hq // (HEADS // KV)
        scores = q[:, :, hq] @ k[:, :, hk].transpose(1, 2) / math.sqrt(D)  # [B, n, n]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, :, hk])
    h1 = residual + lin(torch.cat(heads, dim=-1), "midlayer.self_attn.o_proj.weight")
    m = rms(h1, w["midlayer.post_attention_layernorm.weight"])
    act = torch.nn.functional.silu(lin(m, "midlayer.mlp.gate_proj.weight")) * lin(m, "midlayer.mlp.up_proj.weight")
    h2 = h1 + lin(act, "midlayer.mlp.down_proj.weight")
    return lin(rms(h2, w["norm.weight"]), "lm_head.weight"), h2


def _inputs(seed=1, b=2, n=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, n), generator=g)
    aux = torch.randn(b, n, 3 * H, generator=g)
    pos = torch.arange(3, 3 + n).expand(b, n)  # positions need not start at 0
    return ids, aux, pos


# (format, file, own embed_tokens, norm_before_residual, fc bias): what each case exercises
CASES = {
    "specforge-safetensors-target-embedding": ("specforge", "safetensors", False, False, False),
    "specforge-bin-own-embedding": ("specforge", "bin", True, False, False),
    "speculators-norm-before-residual-fc-bias": ("speculators", "safetensors", False, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_step_equals_plain_reference(case, target, tmp_path):
    fmt, file, embed, nbr, bias = CASES[case]
    w = _weights(seed=len(case), embed=embed, fc_bias=bias)
    if fmt == "specforge":
        write_specforge(tmp_path, w, fmt=file)
    else:
        write_speculators(tmp_path, w, norm_before_residual=nbr)
    head = Eagle3Head.from_pretrained(tmp_path, target)
    assert head.config.norm_before_residual == nbr and head.config.fc_bias == bias
    assert ("embed_tokens.weight" in head.state_dict()) == embed
    ids, aux, pos = _inputs()
    with torch.no_grad():
        logits, feats = head(ids, head.project(aux), pos)
    embedding = w["embed_tokens.weight"] if embed else target.get_input_embeddings().weight.detach()
    ref_logits, ref_feats = reference_step(w, embedding, ids, aux, pos, norm_before_residual=nbr)
    assert logits.shape == (2, 7, VD) and feats.shape == (2, 7, H)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-4, atol=1e-4)


def test_target_embedding_is_shared_not_copied(target, tmp_path):
    head = Eagle3Head.from_pretrained(write_specforge(tmp_path, _weights(0, embed=False)), target)
    assert "embed_tokens.weight" not in head.state_dict()
    assert all(p.data_ptr() != target.get_input_embeddings().weight.data_ptr() for p in head.parameters())
    head.half()  # casting the head leaves the target's embedding alone
    assert target.get_input_embeddings().weight.dtype == torch.float32
    assert head.embed(torch.tensor([[1, 2]])).dtype == torch.float16


def _write_at(cache, slots):
    """TreeCache's write slots are [n] (one row) or [R, n] (rows), depending on its version."""
    cache.write_at(slots[None] if cache.slots.dim() == 2 else slots)


def test_kv_cache_feeds_equal_the_full_pass(target, tmp_path):
    from moe_spec_compile.speculative.kv import TreeCache

    head = Eagle3Head.from_pretrained(write_specforge(tmp_path, _weights(3, embed=False)), target)
    ids, aux, pos = _inputs(seed=4, b=1, n=8)
    feats = head.project(aux)
    S, split = 16, 5
    cache = TreeCache(1, S)
    got = []
    with torch.no_grad():
        full_logits, full_feats = head(ids, feats, pos)
        for lo, hi in ((0, split), (split, 8)):  # two feeds: a prefix, then the rest over the cached keys
            _write_at(cache, torch.arange(lo, hi))
            allowed = torch.arange(S)[None, :] <= torch.arange(lo, hi)[:, None]  # slot j visible from query i
            mask = torch.zeros(1, 1, hi - lo, S).masked_fill(~allowed, torch.finfo(torch.float32).min)
            got.append(head(ids[:, lo:hi], feats[:, lo:hi], pos[:, lo:hi], mask, cache))
    torch.testing.assert_close(torch.cat([g[0] for g in got], 1), full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([g[1] for g in got], 1), full_feats, rtol=1e-5, atol=1e-5)


def test_training_time_test_layout_equals_drafting_a_chain(target, tmp_path):
    """train_eagle's TTT step k at index t = drafting step k of a chain whose prefix ends at t, over a TreeCache:
    the prefix's keys, then the chain's own keys, at positions t + 1, ..., t + k (teacher-forced tokens)."""
    from moe_spec_compile.speculative.kv import TreeCache
    from moe_spec_compile.tiny.train_eagle import ttt_unroll

    head = Eagle3Head.from_pretrained(write_specforge(tmp_path, _weights(11, embed=False)), target)
    g = torch.Generator().manual_seed(12)
    x = torch.randint(0, V, (1, 10), generator=g)
    aux = torch.randn(1, 10, 3 * H, generator=g)
    steps, S = 3, 16
    with torch.no_grad():
        ttt = ttt_unroll(head, aux, x, steps)
        for t in (0, 4, 6):
            cache = TreeCache(1, S)
            _write_at(cache, torch.arange(t + 1))  # the prefix: features of positions 0..t with tokens 1..t+1
            mask = torch.zeros(1, 1, t + 1, S).masked_fill(
                torch.arange(S)[None, :] > torch.arange(t + 1)[:, None], torch.finfo(torch.float32).min)
            logits, h = head(x[:, 1 : t + 2], head.project(aux[:, : t + 1]), torch.arange(t + 1)[None], mask, cache)
            torch.testing.assert_close(logits[:, t], ttt[0][:, t], rtol=1e-5, atol=1e-5)
            h = h[:, t : t + 1]
            for k in range(1, steps):  # one token per step, at slot and position t + k
                _write_at(cache, torch.tensor([t + k]))
                mask = torch.zeros(1, 1, 1, S).masked_fill(torch.arange(S)[None, None, None] > t + k,
                                                           torch.finfo(torch.float32).min)
                logits, h = head(x[:, t + k + 1 : t + k + 2], h, torch.tensor([[t + k]]), mask, cache)
                torch.testing.assert_close(logits[:, 0], ttt[k][:, t], rtol=1e-5, atol=1e-5)


def test_d2t_maps_draft_ids_to_target_ids(target, tmp_path):
    w = _weights(5, embed=False)
    head = Eagle3Head.from_pretrained(write_specforge(tmp_path, w), target)
    keep = torch.nonzero(w["t2d"]).flatten()  # the draft vocabulary's target ids, ascending
    draft_ids = torch.tensor([[0, 7, VD - 1], [3, 3, 12]])
    assert torch.equal(head.to_target_ids(draft_ids), keep[draft_ids])
    assert torch.equal(head.t2d, w["t2d"]) and int(head.t2d.sum()) == VD


def test_missing_t2d_is_derived_and_a_full_vocabulary_needs_no_d2t(target, tmp_path):
    w = _weights(6, embed=False)
    t2d = w.pop("t2d")
    head = Eagle3Head.from_pretrained(write_specforge(tmp_path / "a", w), target)
    assert torch.equal(head.t2d, t2d)
    w = _weights(6, embed=False)
    del w["d2t"], w["t2d"]
    w["lm_head.weight"] = torch.randn(V, H)
    head = Eagle3Head.from_pretrained(write_specforge(tmp_path / "b", w, draft_vocab_size=V), target)
    assert torch.equal(head.to_target_ids(torch.arange(V)), torch.arange(V))


def test_aux_layer_ids_default_and_each_formats_convention(target, tmp_path):
    w = _weights(7, embed=False)
    assert default_aux_layer_ids(L) == (2, L // 2, L - 3) == (2, 4, 5)
    assert Eagle3Head.from_pretrained(write_specforge(tmp_path / "d", w), target).config.aux_layer_ids == (2, 4, 5)
    # SpecForge / SGLang ids name a layer's output: hidden_states[i + 1]
    sf = Eagle3Head.from_pretrained(write_specforge(tmp_path / "s", w, aux_ids=[0, 3, 7]), target)
    assert sf.config.aux_layer_ids == (1, 4, 8)
    # speculators / vLLM ids name a layer's input: hidden_states[i]
    sp = Eagle3Head.from_pretrained(write_speculators(tmp_path / "v", w, aux_ids=[1, 3, 6]), target)
    assert sp.config.aux_layer_ids == (1, 3, 6)
    pinned = Eagle3Head.from_pretrained(tmp_path / "s", target, aux_layer_ids=(2, 3, 4))
    assert pinned.config.aux_layer_ids == (2, 3, 4)


def test_target_features_follow_hidden_states_indices(target):
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        out = target(input_ids=ids, output_hidden_states=True, use_cache=False)
        aux, logits = target_features(target, ids, (1, 4, L), with_logits=True)
    last = {}
    handle = target.model.layers[L - 1].register_forward_hook(lambda m, a, o: last.__setitem__("h", o))
    with torch.no_grad():
        target(input_ids=ids, use_cache=False)
    handle.remove()
    h_last = last["h"][0] if isinstance(last["h"], tuple) else last["h"]
    assert aux.shape == (2, 5, 3 * H)
    torch.testing.assert_close(aux, torch.cat([out.hidden_states[1], out.hidden_states[4], h_last], -1))
    assert not torch.allclose(h_last, out.hidden_states[L])  # hidden_states[L] has the final norm applied
    torch.testing.assert_close(logits, out.logits)


def test_save_pretrained_round_trip(target, tmp_path):
    w = _weights(8, embed=False)
    head = Eagle3Head.from_pretrained(write_specforge(tmp_path / "a", w, aux_ids=[1, 2, 5]), target)
    head.save_pretrained(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 5]
    again = Eagle3Head.from_pretrained(tmp_path / "b", target)
    assert again.config == head.config
    ids, aux, pos = _inputs(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, again.project(aux), pos), head(ids, head.project(aux), pos))


def _bad(tmp_path, w=None, **over):
    return write_specforge(tmp_path, _weights(10, embed=False) if w is None else w, **over)


@pytest.mark.parametrize("what, field", [
    ("wrong target hidden size", "hidden_size"),
    ("wrong vocabulary", "vocab_size"),
    ("layer id out of range", "eagle_aux_hidden_state_layer_ids"),
    ("missing tensor", "midlayer.mlp.up_proj.weight"),
    ("two layers", "num_hidden_layers"),
    ("wrong shape", "lm_head.weight"),
    ("d2t length", "d2t"),
    ("speculators layers.1", "num_hidden_layers"),
])
def test_bad_checkpoints_are_refused_naming_the_field(what, field, target, tmp_path):
    w = _weights(10, embed=False)
    if what == "wrong target hidden size":
        path = _bad(tmp_path, target_hidden_size=2 * H)
    elif what == "wrong vocabulary":
        path = _bad(tmp_path, vocab_size=V + 8)
    elif what == "layer id out of range":
        path = _bad(tmp_path, aux_ids=[1, 2, L])  # SpecForge id L = hidden_states[L + 1]: past the last layer
    elif what == "missing tensor":
        del w["midlayer.mlp.up_proj.weight"]
        path = _bad(tmp_path, w)
    elif what == "two layers":
        path = _bad(tmp_path, num_hidden_layers=2)
    elif what == "wrong shape":
        w["lm_head.weight"] = torch.randn(VD + 1, H)
        path = _bad(tmp_path, w)
    elif what == "d2t length":
        w["d2t"] = w["d2t"][:-1]
        path = _bad(tmp_path, w)
    else:
        w["layers.1.mlp.up_proj.weight"] = torch.randn(INTER, H)
        path = write_speculators(tmp_path, w)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        Eagle3Head.from_pretrained(path, target)


def test_config_rejects_a_wrong_number_of_aux_layers():
    with pytest.raises(ValueError, match="aux_layer_ids"):
        Eagle3Config(hidden_size=H, target_hidden_size=H, vocab_size=V, draft_vocab_size=VD, num_attention_heads=HEADS,
                     num_key_value_heads=KV, head_dim=D, intermediate_size=INTER, aux_layer_ids=(1, 2))


# --- the shipped head for the bundled target -------------------------------------------------------------------------
def _shipped():
    from moe_spec_compile.tiny import HERE

    return HERE / "eagle3"


# measured: 0.688 on this slice (the first 2 x 129 tokens of heldout_sample.txt); 0.635 over train_eagle's 64
# held-out windows, where the bundled dense draft agrees 0.554
SHIPPED_STEP0_FLOOR = 0.6


@pytest.mark.skipif(not (_shipped() / "model.safetensors").exists(), reason="no shipped EAGLE-3 head")
def test_shipped_head_loads_and_agrees_with_the_target():
    from moe_spec_compile.tiny import heldout_text, load_tiny

    target, _, tok = load_tiny()
    head = Eagle3Head.from_pretrained(_shipped(), target)
    assert (_shipped() / "model.safetensors").stat().st_size <= 3e6
    assert head.config.aux_layer_ids == (1, 3, 5)
    ids = torch.tensor(tok(heldout_text())["input_ids"])[: 2 * 129].view(2, 129)
    with torch.no_grad():
        aux, logits_t = target_features(target, ids, head.config.aux_layer_ids, with_logits=True)
        # step 0: features of position t with the token of t + 1 predict the target's choice at t + 1
        logits, _ = head(ids[:, 1:], head.project(aux[:, :-1]), torch.arange(128).expand(2, 128))
    agree = (head.to_target_ids(logits.argmax(-1)) == logits_t[:, 1:].argmax(-1)).float().mean().item()
    assert agree >= SHIPPED_STEP0_FLOOR


# --- the drafter ----------------------------------------------------------------------------------------------------
def _drafter(target, tmp_path, seed=21, **kwargs):
    import moe_spec_compile as msc

    w = _weights(seed, embed=False)
    with torch.no_grad():  # a sharper head, so its top choices are not near ties
        w["lm_head.weight"] *= 4
    return msc.Eagle3Drafter.from_pretrained(write_specforge(tmp_path, w), target, **kwargs), w


def test_drafter_chain_equals_the_plain_reference(target, tmp_path):
    """A drafted chain: step 1 takes the target's features of the prompt (position t's with token t + 1) and the
    root; each further step the head's own output feature of the node before, over the keys of all before it.
    The reference recomputes every step from scratch in plain torch (reference_step, no cache)."""
    import moe_spec_compile as msc

    drafter, w = _drafter(target, tmp_path)
    assert drafter.feature_layers == default_aux_layer_ids(L)
    g = torch.Generator().manual_seed(5)
    ids, root, depth = torch.randint(0, V, (1, 9), generator=g), 17, 3
    with torch.no_grad():
        aux = target_features(target, ids, drafter.feature_layers)  # [1, 9, 3H]
        drafter.start(ids, [0], 64, features=aux)
        tree = drafter.draft([root], msc.TreeSpec(depth, depth, 1), [True])
        embedding = target.get_input_embeddings().weight.detach()
        d2t = w["d2t"]
        tokens = torch.cat([ids[:, 1:], torch.tensor([[root]])], 1)  # tokens 1..8 and the root
        feats = w["fc.weight"] @ aux[0].T  # [H, 9] the prompt's features after fc
        feats = feats.T[None]
        want, logps = [root], [0.0]
        for _ in range(depth):
            n = tokens.shape[1]
            logits, h = reference_step(w, embedding, tokens, None, torch.arange(n)[None], feats=feats)
            lp = logits[0, -1].log_softmax(-1)
            best = int(lp.argmax())
            want.append(best + int(d2t[best]))
            logps.append(logps[-1] + float(lp[best]))
            tokens = torch.cat([tokens, torch.tensor([[want[-1]]])], 1)
            feats = torch.cat([feats, h[:, -1:]], 1)  # the next token's input: this step's output feature
    assert tree.tokens[0].tolist() == want
    torch.testing.assert_close(tree.logprob[0], torch.tensor(logps), rtol=1e-4, atol=1e-4)


def _left_padded(rows, pad_id=0):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("tree", [3, "dynamic", "static"])
def test_greedy_equals_the_target(tree, target, tmp_path):
    """Greedy speculative decoding with the head (features from the verify passes, none recomputed) emits the
    target's own greedy tokens: a chain, an EAGLE-2 dynamic tree and a static tree, for a batch of left-padded
    prompts of different lengths."""
    import moe_spec_compile as msc
    from moe_spec_compile.speculative import StaticTree

    shape = {3: 3, "dynamic": msc.TreeSpec(8, 3, 2), "static": StaticTree([(0,), (1,), (0, 0), (0, 1)])}[tree]
    drafter, _ = _drafter(target, tmp_path)
    g = torch.Generator().manual_seed(6)
    ids, mask = _left_padded([torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 4, 9)])
    dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=shape)
    out = dec.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    want = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert out.sequences.tolist() == want.tolist()
    assert out.stats.tokens_per_step > 1  # drafts were accepted: the features reached the head
    one = dec.generate(ids[2:], attention_mask=mask[2:], max_new_tokens=10, eos_token_id=None)
    assert one.sequences.tolist() == want[2:].tolist()


def test_greedy_through_the_moespec_graph(target, tmp_path):
    """The verify pass compiled by the moespec backend returns the aux hidden states beside the logits: greedy
    output equals the target's, and the head drafts exactly what it drafts from the uncompiled target's features
    (the same accepted length at every step)."""
    import moe_spec_compile as msc

    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(9))
    want = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    runs = []
    for compile in (False, True):
        torch._dynamo.reset()
        drafter, _ = _drafter(target, tmp_path / str(compile))
        dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=msc.TreeSpec(6, 3, 2), compile=compile,
                                     compile_options={"inner": "eager"})
        out = dec.generate(ids, max_new_tokens=16, eos_token_id=None)
        assert out.sequences.tolist() == want.tolist()
        runs.append(out.stats.accepted_per_step)
    assert runs[0] == runs[1] and max(runs[0]) > 1, runs  # drafts accepted, step for step the same


@pytest.mark.skipif(not (_shipped() / "model.safetensors").exists(), reason="no shipped EAGLE-3 head")
def test_compiled_chains_compile_once_per_length():
    """A compiled drafter's chain (first feed and steps in one inductor graph, dynamic shapes) keeps greedy output
    the target's and compiles once per chain length: two graphs (a feed of one token, of more), whatever feed
    widths the accepted lengths bring and when its cache grows (a longer request), none in the middle of decoding.
    The shipped head on the bundled target: it accepts enough for feeds of several widths."""
    import moe_spec_compile as msc
    from moe_spec_compile.tiny import heldout_text, load_tiny

    torch._dynamo.reset()
    target, _, tok = load_tiny()
    drafter = msc.Eagle3Drafter.from_pretrained(_shipped(), target, compile=True)
    dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=3)
    ids = torch.tensor(tok(heldout_text())["input_ids"])[None, :16]
    widths = set()
    plan = drafter._plan_feed

    def spy(*args):
        out = plan(*args)
        widths.add(out[0].shape[1])
        return out

    drafter._plan_feed = spy

    def graphs():
        code = drafter._chain_fn._torchdynamo_orig_callable.__code__
        return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))

    for n, max_len in ((24, 64), (64, 128)):
        want = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        assert dec.generate(ids, max_new_tokens=n, eos_token_id=None).sequences.tolist() == want.tolist()
        assert drafter.max_len == max_len and graphs() <= 2
    assert len(widths) >= 3, widths  # feeds of several widths ran through the same graphs


def test_graph_replays_equal_eager_passes(monkeypatch, target, tmp_path):
    """Both runners on their CUDA-graph path (emulated on the CPU, graph_replay.py): the verify passes returning the
    aux features and the head's drafting passes fed the features as static inputs, on a left-padded batch, exact and
    under budgets, draft and emit what eager passes do (and greedy equals the target's)."""
    from graph_replay import emulate_cuda_graphs

    import moe_spec_compile as msc

    emulate_cuda_graphs(monkeypatch)
    g = torch.Generator().manual_seed(12)
    ids, mask = _left_padded([torch.randint(0, V, (n,), generator=g).tolist() for n in (8, 3, 6)])
    want = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    runs = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        drafter, _ = _drafter(target, tmp_path / str(graphs), cuda_graphs=graphs)
        if graphs:  # a drafter's graphs are on only on a CUDA device: claim one
            monkeypatch.setattr(type(drafter), "cuda_graphs", property(lambda self: self._cuda_graphs))
        dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=msc.TreeSpec(6, 3, 2), compile=True,
                                     compile_options={"inner": "eager"})
        dec.runner.use_graphs = graphs
        outs = [dec.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, budget=c,
                             tree=t) for c in (None, 2, 3) for t in (3, msc.TreeSpec(6, 3, 2))]
        runs[graphs] = [(o.sequences.tolist(), o.stats.accepted_per_step) for o in outs]
        if graphs:
            assert dec.runner.graphs and drafter._passes().graphs and drafter._chain_graphs  # all replayed
    assert runs[False][0][0] == runs[False][1][0] == want.tolist()
    # (acceptance through the features is checked with the shipped head: test_every_exact_path_on_a_padded_batch; a
    # random head on this random target accepts nothing, and a sum over 3 rows is > 1 whatever is accepted)
    assert runs[True] == runs[False]


def test_bad_drafter_arguments(target, tmp_path):
    import moe_spec_compile as msc

    drafter, w = _drafter(target, tmp_path)
    with pytest.raises(ValueError, match="Eagle3Head"):
        msc.Eagle3Drafter(object(), target)
    with pytest.raises(ValueError, match="aux_layer_ids"):  # hidden_states[L] is no output of a verify pass
        msc.Eagle3Drafter.from_pretrained(tmp_path, target, aux_layer_ids=(1, 2, L))
    with pytest.raises(ValueError, match="features"):  # the drafter needs the decoder's features
        drafter.start(torch.tensor([[1, 2, 3]]), [0], 32)


def test_sampling_keeps_the_target_distribution():
    """Sampled with a random head over a draft vocabulary of 8 of the 12 tokens: the second and third tokens
    follow the target's own conditionals (chi-square, as test_speculative_sampling checks the dense drafter)."""
    from test_speculative_sampling import _tiny_pair, assert_sampling_keeps_distribution

    import moe_spec_compile as msc

    vocab = 12
    target, _ = _tiny_pair(vocab)
    hidden = target.config.hidden_size
    cfg = Eagle3Config(hidden_size=hidden, target_hidden_size=hidden, vocab_size=vocab, draft_vocab_size=8,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=12, intermediate_size=32,
                       aux_layer_ids=(0, 1, 1))
    torch.manual_seed(3)
    head = Eagle3Head(cfg, embed_tokens=target.get_input_embeddings()).eval()
    keep = torch.tensor([0, 1, 2, 4, 5, 7, 9, 11])
    head.d2t.copy_(keep - torch.arange(8))
    assert_sampling_keeps_distribution(target, msc.Eagle3Drafter(head, target), msc.TreeSpec(4, 2, 2), vocab)


def test_rows_that_finish_early_are_packed_away(target, tmp_path):
    """A row that meets EOS stops; the live rows move to a smaller rows bucket (Drafter.select: the head's cache and
    the target's features by slot go with them) and still emit the target's greedy tokens."""
    import moe_spec_compile as msc

    drafter, _ = _drafter(target, tmp_path)
    g = torch.Generator().manual_seed(8)
    ids, mask = _left_padded([torch.randint(0, V, (n,), generator=g).tolist() for n in (6, 8, 5, 7, 6)])
    free = target.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 1])  # row 0's second new token: it stops there, the others later or never
    want = target.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=eos,
                           eos_token_id=eos)
    dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=msc.TreeSpec(6, 3, 2))
    packed = []
    select = drafter.select
    drafter.select = lambda rows: packed.append(len(rows)) or select(rows)
    out = dec.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos)
    assert out.sequences.tolist() == want.tolist()
    assert min(r.new_tokens for r in out.stats.rows) <= 2 < max(r.new_tokens for r in out.stats.rows)
    assert packed and packed[0] < 8  # five rows in a bucket of 8, packed into a smaller one


@pytest.mark.skipif(not (_shipped() / "model.safetensors").exists(), reason="no shipped EAGLE-3 head")
def test_every_exact_path_on_a_padded_batch():
    """The default inductor path (compile=True, inner inductor) on a left-padded batch, the shipped head on the
    bundled target: while a pass shape is measured, the moespec graph, the plain target and the plain target with
    batched_mm experts each verify steps and return the aux features the head reads; the output stays the target's
    greedy output, drafts are accepted, and the model's own experts setting is unchanged after."""
    import moe_spec_compile as msc
    from moe_spec_compile.tiny import heldout_text, load_tiny

    torch._dynamo.reset()
    target, _, tok = load_tiny()
    text = torch.tensor(tok(heldout_text())["input_ids"])
    ids, mask = _left_padded([text[s : s + n].tolist() for s, n in ((0, 12), (40, 5), (90, 9))])
    want = target.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    drafter = msc.Eagle3Drafter.from_pretrained(_shipped(), target)
    dec = msc.SpeculativeDecoder(target, drafter=drafter, tree=3, compile=True, collect_expert_stats=False)
    out = dec.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    assert out.sequences.tolist() == want.tolist()
    assert {v.path for v in out.stats.verify} == {"moespec", "plain", "batched_mm"}
    assert any(a > 1 for row in out.stats.rows for a in row.accepted_per_step)  # the features reached the head
    assert target.config._experts_implementation == "grouped_mm"
