"""The EAGLE-3 draft head (one decoder layer over the target's own features, with a reduced draft vocabulary) and
Eagle3Drafter, which drafts with it inside SpeculativeDecoder from the features its verify passes return.

aux [B, n, 3Ht] --fc--> h [B, n, H];  e = embed(token)  ->  midlayer: attn(cat(input_layernorm(e), hidden_norm(h)))
+ residual -> SwiGLU(post_attention_layernorm(.)) + residual = h' (the next step's feature) -> norm -> lm_head
-> draft logits [B, n, Vd] -> target id = draft id + d2t[draft id]

Legend: B batch, n tokens of the pass, S key slots, H head hidden, Ht target hidden, V target vocabulary,
Vd draft vocabulary, L target layers, Hq / Hkv query / key-value heads, d head dim.

The layer is EAGLE-3's as SpecForge (modeling/draft/llama3_eagle.py: LlamaForCausalLMEagle3), vLLM
(model_executor/models/llama_eagle3.py) and speculators (models/eagle3.py: Eagle3DecoderLayer) define it:
q/k/v_proj take the 2H concatenation, residual = h (or hidden_norm(h) with the speculators flag
``norm_before_residual``, which vLLM also reads), RoPE on the layer's own positions, the pre-norm output is the
next step's feature. The token embedding is the head's ``embed_tokens`` when the checkpoint has one, else the
target's input embedding module itself (shared, not copied, and never converted by ``head.to(...)``).

Alignment (as vLLM, SGLang and SpecForge feed it): the head's input at position t is the target's features of
position t with the token of position t + 1, and its output predicts the token of position t + 2. A drafted chain
continues at position t + 1 with the head's own output feature of position t and the drafted token, and so on; its
keys sit beside the prefix's in the head's KV cache. RoPE only sees differences of positions, so any constant offset
(speculators counts from 1) gives the same numbers.

Which target layers feed it (``aux_layer_ids``), and the off-by-one the engines disagree on
------------------------------------------------------------------------------------------
Here an aux layer id i is an index into transformers' ``output_hidden_states``: hidden_states[0] is the
embedding output and hidden_states[i] the input of decoder layer i, i.e. the output of layer i - 1 (checked on
the bundled Qwen3-MoE with transformers 5.2x: hidden_states[2] is what enters layers[2]). hidden_states[L] is
*not* used for i = L: transformers applies the final norm to it; i = L here means the last layer's pre-norm output
(what vLLM's end-of-stack capture and a hook on the last layer give). Valid ids: 0 <= i <= L.
- vLLM (models/llama.py forward: ``if idx in aux_hidden_state_layers: aux.append(hidden_states + residual)``
  before layer idx runs; v1/worker/gpu_model_runner.py ``_get_eagle3_aux_layers_from_config`` reads the
  checkpoint's ``eagle_aux_hidden_state_layer_ids``, top level or under ``eagle_config``, as is): both its default
  (2, L // 2, L - 3) and a checkpoint's ids name the *input* of layer i = hidden_states[i].
- speculators (models/utils.py ``resolve_target_layer_ids``; its data comes from vLLM): the same as vLLM, and it
  allows i = L (the final layer's output).
- SGLang (models/llama.py ``set_eagle3_layers_to_capture``): the default (2, L // 2, L - 3) is captured before
  layer i, as in vLLM, but a checkpoint's ids get ``+ 1``: they name the *output* of layer i = hidden_states[i + 1].
- SpecForge (core/eagle3.py, modeling/target/eagle3_target_model.py): the default is hidden_states[1 + 1],
  hidden_states[L // 2 - 1 + 1], hidden_states[L - 4 + 1] (= (2, L // 2, L - 3), the same features as the
  engines' default; its code says it is "modified from" EAGLE's traineagle3/cnets.py, which was not read here);
  explicit ids are forward hooks on ``layers[i]``'s output (HF backend) or go through SGLang's ``+ 1``: the output
  of layer i = hidden_states[i + 1], as SGLang.
So the same explicit ids mean different layers in vLLM and in SGLang. Loading follows the format's own engine:
the EAGLE / SpecForge format (``LlamaForCausalLMEagle3``) means SGLang's / SpecForge's output-of-layer-i (id + 1
here), the speculators format vLLM's input-of-layer-i (as is); ``from_pretrained(..., aux_layer_ids=...)`` pins
hidden_states indices and overrides both. ``save_pretrained`` writes the SpecForge format, so it writes id - 1.
Without ids in the checkpoint the default (2, L // 2, L - 3) applies, which every engine reads alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from .speculative.drafters import ModelDrafter
from .speculative.kv import forward

__all__ = ["Eagle3Config", "Eagle3Head", "Eagle3Drafter", "default_aux_layer_ids", "target_features"]

SPECFORGE_ARCH = "LlamaForCausalLMEagle3"


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """(2, L // 2, L - 3): the hidden_states indices vLLM and SGLang capture by default (see the module doc)."""
    return (2, num_layers // 2, num_layers - 3)


@dataclass
class Eagle3Config:
    """The head's shape. vocab_size is the target's vocabulary, draft_vocab_size the head's output size.
    aux_layer_ids are hidden_states indices of the target (module doc); norm_before_residual is the speculators
    flag (residual = hidden_norm(h)); fc_bias: older speculators checkpoints have a bias on fc."""

    hidden_size: int
    target_hidden_size: int
    vocab_size: int
    draft_vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    aux_layer_ids: tuple[int, int, int] = field(default=(2, 3, 3))
    norm_before_residual: bool = False
    hidden_act: str = "silu"
    fc_bias: bool = False

    def __post_init__(self):
        self.aux_layer_ids = tuple(int(i) for i in self.aux_layer_ids)
        if len(self.aux_layer_ids) != 3:
            raise ValueError(f"aux_layer_ids: EAGLE-3 takes 3 target layers, got {self.aux_layer_ids}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")


class _RMSNorm(nn.Module):
    """weight * x / rms(x), computed in fp32 (as transformers' LlamaRMSNorm)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class _Attention(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.hq, self.hkv, self.d, self.theta = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta
        self.q_proj = nn.Linear(2 * c.hidden_size, self.hq * self.d, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, self.hkv * self.d, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, self.hkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.hq * self.d, c.hidden_size, bias=False)

    def rope(self, position_ids, dtype):
        """cos, sin [B, 1, n, d] of the default RoPE at position_ids [B, n] (computed in fp32)."""
        inv = self.theta ** (-torch.arange(0, self.d, 2, device=position_ids.device, dtype=torch.float32) / self.d)
        freqs = position_ids.float()[..., None] * inv  # [B, n, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x, position_ids, attention_mask, cache):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.hq, self.d).transpose(1, 2)  # [B, Hq, n, d]
        k = self.k_proj(x).view(b, n, self.hkv, self.d).transpose(1, 2)  # [B, Hkv, n, d]
        v = self.v_proj(x).view(b, n, self.hkv, self.d).transpose(1, 2)
        cos, sin = self.rope(position_ids, q.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:
            if attention_mask is None:
                raise ValueError("a pass over a KV cache needs its attention_mask [B, 1, n, S]")
            k, v = cache.update(k, v, 0)  # [B, Hkv, S, d]: every slot, the mask says which count
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask,
                                             is_causal=attention_mask is None, enable_gqa=self.hq != self.hkv)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.hq * self.d))


class _MLP(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MidLayer(nn.Module):
    """The one decoder layer; parameter names as the SpecForge checkpoints store them under ``midlayer.``."""

    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.norm_before_residual = c.norm_before_residual
        self.input_layernorm = _RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = _RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = _Attention(c)
        self.mlp = _MLP(c)

    def forward(self, emb, h, position_ids, attention_mask, cache):
        normed = self.hidden_norm(h)
        residual = normed if self.norm_before_residual else h
        x = torch.cat((self.input_layernorm(emb), normed), dim=-1)  # [B, n, 2H]
        h = residual + self.self_attn(x, position_ids, attention_mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(nn.Module):
    """EAGLE-3 draft head. forward(input_ids, features, position_ids, attention_mask, past_key_values) ->
    (draft logits [B, n, Vd], next features [B, n, H]); features are fc-projected (``project(aux)``)."""

    def __init__(self, config: Eagle3Config, embed_tokens: nn.Module | None = None, own_embedding: bool = False):
        super().__init__()
        c = self.config = config
        self.fc = nn.Linear(3 * c.target_hidden_size, c.hidden_size, bias=c.fc_bias)
        self.midlayer = _MidLayer(c)
        self.norm = _RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))  # [Vd]
        self.register_buffer("t2d", torch.ones(c.vocab_size, dtype=torch.bool) if c.draft_vocab_size == c.vocab_size
                             else torch.zeros(c.vocab_size, dtype=torch.bool))  # [V]
        if own_embedding:
            self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        elif embed_tokens is None:
            raise ValueError("the head needs an embedding: its own (own_embedding=True) or the target's")
        # the target's module, kept out of the registered submodules: not saved, not moved or cast with the head
        self._shared_embed = [embed_tokens] if not own_embedding else []

    # --- the draft step ----------------------------------------------------------------------------
    def embed(self, input_ids):
        """[B, n] target ids -> [B, n, H] in the head's dtype."""
        module = self.embed_tokens if not self._shared_embed else self._shared_embed[0]
        return module(input_ids).to(self.fc.weight.dtype)

    def project(self, aux):
        """aux [B, n, 3Ht] (the target's three features, concatenated in aux_layer_ids order) -> [B, n, H]."""
        return self.fc(aux.to(self.fc.weight.dtype))

    def forward(self, input_ids, features, position_ids, attention_mask=None, past_key_values=None):
        """input_ids [B, n] (target ids), features [B, n, H] (fc-projected target features, or the head's own
        output of the previous step), position_ids [B, n], attention_mask additive [B, 1, n, S] (or bool).
        past_key_values: an object whose ``update(keys, values, 0)`` stores the pass's [B, Hkv, n, d] and returns
        all [B, Hkv, S, d] (the decoder's TreeCache); None attends only the n given tokens (causal when no mask).
        Returns (draft logits [B, n, Vd], next features [B, n, H] = the layer's output before the final norm)."""
        h = self.midlayer(self.embed(input_ids), features, position_ids, attention_mask, past_key_values)
        return self.lm_head(self.norm(h)), h

    def to_target_ids(self, draft_ids):
        """draft vocabulary ids (any shape) -> target ids: id + d2t[id]."""
        return draft_ids + self.d2t[draft_ids]

    # --- checkpoints -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, target, aux_layer_ids=None, dtype: torch.dtype | None = None, device=None):
        """Load a local EAGLE / SpecForge or speculators checkpoint for `target` (module doc: formats and the aux
        layer convention). A mismatch with the target raises ValueError naming the field. dtype / device default
        to the target's. aux_layer_ids: hidden_states indices that override the checkpoint's."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: no config.json")
        raw = json.loads((path / "config.json").read_text())
        tcfg = _text_config(target)
        config, ckpt_ids = _parse_config(raw, tcfg)
        n_layers = int(tcfg.num_hidden_layers)
        ids = ckpt_ids if aux_layer_ids is None else tuple(aux_layer_ids)
        config.aux_layer_ids = default_aux_layer_ids(n_layers) if ids is None else tuple(int(i) for i in ids)
        bad = [i for i in config.aux_layer_ids if not 0 <= i <= n_layers]
        if len(config.aux_layer_ids) != 3 or bad:
            raise ValueError(f"eagle_aux_hidden_state_layer_ids: {config.aux_layer_ids} (as hidden_states indices) "
                             f"must be 3 ids in [0, {n_layers}] for a target of {n_layers} layers")
        state = _read_state(path, speculators="speculators_model_type" in raw)
        own = "embed_tokens.weight" in state
        config.fc_bias = "fc.bias" in state
        embed = target.get_input_embeddings()
        if not own and embed.weight.shape[-1] != config.hidden_size:
            raise ValueError(f"hidden_size {config.hidden_size}: the checkpoint has no embed_tokens and the target's "
                             f"embedding is {embed.weight.shape[-1]} wide")
        head = cls(config, embed_tokens=embed, own_embedding=own)
        _check_and_load(head, state)
        p = next(target.parameters())
        return head.to(device=device or p.device, dtype=dtype or p.dtype).eval()

    def save_pretrained(self, path) -> None:
        """config.json + model.safetensors in the EAGLE / SpecForge format (``LlamaForCausalLMEagle3``); the aux
        layer ids are written as SpecForge / SGLang read them (hidden_states index - 1, module doc)."""
        from safetensors.torch import save_file

        c = self.config
        if min(c.aux_layer_ids) < 1:
            raise ValueError(f"aux_layer_ids {c.aux_layer_ids}: hidden_states[0] (the embeddings) has no "
                             "output-of-layer id in the SpecForge format")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dtype = self.fc.weight.dtype
        cfg = {"architectures": [SPECFORGE_ARCH], "model_type": "llama", "num_hidden_layers": 1,
               "hidden_size": c.hidden_size, "target_hidden_size": c.target_hidden_size,
               "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
               "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "hidden_act": c.hidden_act,
               "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": None,
               "max_position_embeddings": 2048, "vocab_size": c.vocab_size, "draft_vocab_size": c.draft_vocab_size,
               "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
               "norm_before_residual": c.norm_before_residual, "torch_dtype": str(dtype).removeprefix("torch."),
               "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in c.aux_layer_ids],
                                "use_aux_hidden_state": True}}
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


# --- loading helpers ------------------------------------------------------------------------------------------------
def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _rope_theta(c: dict) -> float:
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"rope_scaling: RoPE type {kind!r} is not supported (only the default RoPE)")
    return float(c.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _parse_config(raw: dict, tcfg) -> tuple[Eagle3Config, tuple[int, ...] | None]:
    """(config without aux ids, the checkpoint's aux ids as hidden_states indices or None); checks the target."""
    if raw.get("speculators_model_type") is not None:
        if raw["speculators_model_type"] != "eagle3":
            raise ValueError(f"speculators_model_type {raw['speculators_model_type']!r}: only 'eagle3' is supported")
        layer = raw.get("transformer_layer_config")
        if not isinstance(layer, dict):
            raise ValueError("transformer_layer_config: missing from a speculators config")
        if raw.get("norm_before_fc"):
            raise ValueError("norm_before_fc: an input norm before fc is not supported")
        top = raw
        ids = raw.get("eagle_aux_hidden_state_layer_ids")
        shift = 0  # vLLM's meaning: the input of layer i
    else:
        arch = raw.get("architectures") or []
        if SPECFORGE_ARCH not in arch:
            raise ValueError(f"architectures {arch}: expected [{SPECFORGE_ARCH!r}] or a speculators config")
        layer = top = raw
        ids = raw.get("eagle_aux_hidden_state_layer_ids") or (raw.get("eagle_config") or {}).get(
            "eagle_aux_hidden_state_layer_ids")
        shift = 1  # SGLang's / SpecForge's meaning: the output of layer i
    if layer.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"num_hidden_layers {layer.get('num_hidden_layers')}: an EAGLE-3 head has 1 layer")
    for flag in ("attention_bias", "mlp_bias"):
        if layer.get(flag):
            raise ValueError(f"{flag}: biases in the decoder layer are not supported")
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if not isinstance(layer.get(name), int):
            raise ValueError(f"{name}: missing from the config")
    hidden, heads = layer["hidden_size"], layer["num_attention_heads"]
    config = Eagle3Config(
        hidden_size=hidden, target_hidden_size=top.get("target_hidden_size") or hidden,
        vocab_size=layer["vocab_size"], draft_vocab_size=top.get("draft_vocab_size") or layer["vocab_size"],
        num_attention_heads=heads, num_key_value_heads=layer.get("num_key_value_heads") or heads,
        head_dim=layer.get("head_dim") or hidden // heads, intermediate_size=layer["intermediate_size"],
        rms_norm_eps=float(layer.get("rms_norm_eps") or 1e-6), rope_theta=_rope_theta(layer),
        norm_before_residual=bool(top.get("norm_before_residual", False)),
        hidden_act=layer.get("hidden_act", "silu"))
    if config.target_hidden_size != tcfg.hidden_size:
        name = "target_hidden_size" if top.get("target_hidden_size") else "hidden_size"
        raise ValueError(f"{name} {config.target_hidden_size}: the target's hidden_size is {tcfg.hidden_size}")
    if config.vocab_size != tcfg.vocab_size:
        raise ValueError(f"vocab_size {config.vocab_size}: the target's vocab_size is {tcfg.vocab_size}")
    if not 0 < config.draft_vocab_size <= config.vocab_size:
        raise ValueError(f"draft_vocab_size {config.draft_vocab_size}: must be in [1, vocab_size {config.vocab_size}]")
    if ids is not None:
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"eagle_aux_hidden_state_layer_ids {ids!r}: expected a list of ints")
        ids = tuple(i + shift for i in ids)
    return config, ids


_IGNORED = ("verifier_lm_head.weight", "verifier_norm.weight")  # speculators' training-only copies of the target's


def _read_state(path: Path, speculators: bool) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin")
    out = {}
    for name, t in state.items():
        name = name.removeprefix("model.") if name.startswith("model.") and "lm_head" not in name else name
        if name in _IGNORED:
            continue
        if name.startswith("layers."):  # speculators (and vLLM) name the one layer layers.0
            if not name.startswith("layers.0."):
                raise ValueError(f"num_hidden_layers: the checkpoint has {name} (an EAGLE-3 head has 1 layer)")
            name = "midlayer." + name.removeprefix("layers.0.")
        out[name] = t
    return out


def _check_and_load(head: Eagle3Head, state: dict[str, torch.Tensor]) -> None:
    c = head.config
    expected = head.state_dict()
    state = dict(state)
    if "d2t" not in state:
        if c.draft_vocab_size != c.vocab_size:
            raise ValueError(f"d2t: missing, and draft_vocab_size {c.draft_vocab_size} < vocab_size {c.vocab_size}")
        state["d2t"] = torch.zeros(c.draft_vocab_size, dtype=torch.long)
    missing = sorted(set(expected) - set(state) - {"t2d"})
    if missing:
        raise ValueError(f"missing tensor(s): {', '.join(missing)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected tensor(s): {', '.join(unexpected)}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(expected[name].shape)} from the config")
    d2t = state["d2t"].long()
    target_ids = torch.arange(c.draft_vocab_size) + d2t
    if target_ids.numel() and (target_ids.min() < 0 or target_ids.max() >= c.vocab_size):
        raise ValueError(f"d2t: maps draft ids outside the target vocabulary [0, {c.vocab_size})")
    t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
    t2d[target_ids] = True
    if "t2d" in state and not torch.equal(state["t2d"].bool(), t2d):
        raise ValueError("t2d: does not mark exactly the target ids that d2t maps to")
    state["d2t"], state["t2d"] = d2t, t2d
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


# --- the target's side --------------------------------------------------------------------------------------------
def target_features(target, input_ids, layer_ids, attention_mask=None, position_ids=None, with_logits: bool = False):
    """The three aux features concatenated [B, T, 3Ht] from one target forward (output_hidden_states=True):
    layer id i < L is hidden_states[i] (the input of layer i); i = L is the last layer's output before the final
    norm (taken by a forward hook, since hidden_states[L] has the norm applied). with_logits: also the logits."""
    n_layers = int(_text_config(target).num_hidden_layers)
    last = {}
    handle = None
    if n_layers in layer_ids:
        layers = getattr(target, "model", target).layers
        handle = layers[n_layers - 1].register_forward_hook(
            lambda m, a, o: last.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        out = target(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     output_hidden_states=True, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    hs = out.hidden_states
    aux = torch.cat([last["h"] if i == n_layers else hs[i] for i in layer_ids], dim=-1)
    return (aux, out.logits) if with_logits else aux


# --- the drafter --------------------------------------------------------------------------------------------------
class _HeadPass(nn.Module):
    """The head as the drafting passes call a model (speculative.kv.forward): input_ids, position_ids,
    attention_mask, past_key_values (the drafter's TreeCache, one layer) and features [R, n, H] -> logits over the
    target's vocabulary (-inf off the draft vocabulary, so a top-k only ever picks draft tokens) and
    hidden_states = (the head's output features [R, n, H],)."""

    def __init__(self, head: Eagle3Head, vocab_size: int):
        super().__init__()
        self.head = head
        self.vocab_size = vocab_size
        self.config = PretrainedConfig(num_hidden_layers=1)  # the drafter's cache and masks read this
        d = head.config.draft_vocab_size
        self.register_buffer("target_ids", torch.arange(d, device=head.d2t.device) + head.d2t, persistent=False)

    def forward(self, input_ids, position_ids, attention_mask, past_key_values, features, use_cache=True,
                output_hidden_states=False):
        logits, h = self.head(input_ids, features, position_ids, attention_mask, past_key_values)
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return CausalLMOutputWithPast(logits=full.index_copy(-1, self.target_ids, logits), hidden_states=(h,))


class Eagle3Drafter(ModelDrafter):
    """Drafts with an EAGLE-3 head from the target's own features, which the decoder's verify passes return
    (``feature_layers`` = the head's aux_layer_ids: no second target forward, in the moespec graph, under CUDA
    graphs and under a budget).

    target features by slot [R, S, 3Ht] (prefill, every accepted path) --fc--> the head's input beside the next
    token's embedding; drafted levels take the head's own output feature of their parent.

    Everything else is ModelDrafter's: chains, EAGLE-2 dynamic trees (cumulative log-probabilities, top-k per
    level, rerank to the tree budget), static trees, batches (one head pass per level for all rows), compile and
    CUDA graphs per drafting pass shape, the KV cache at the target's slots. One difference, as EAGLE's engines
    do: the accepted drafts are fed again at the next step with the target's features (their keys while drafting
    came from the head's own features), so accept() moves no KV.

        head = msc.Eagle3Head.from_pretrained("path/to/eagle3", target)   # or Eagle3Drafter.from_pretrained
        dec = msc.SpeculativeDecoder(target, drafter=msc.Eagle3Drafter(head, target), tree=msc.TreeSpec(16, 4, 4))
    """

    def __init__(self, head: Eagle3Head, target, compile: bool = False, cuda_graphs: bool | None = None):
        if not isinstance(head, Eagle3Head):
            raise ValueError(f"head must be an Eagle3Head, got {type(head).__name__}")
        tcfg = _text_config(target)
        c = head.config
        for name, mine, theirs in (("vocab_size", c.vocab_size, tcfg.vocab_size),
                                   ("target_hidden_size", c.target_hidden_size, tcfg.hidden_size)):
            if mine != theirs:
                raise ValueError(f"{name}: the head has {mine}, the target {theirs}")
        n = int(tcfg.num_hidden_layers)
        if any(not 0 <= i < n for i in c.aux_layer_ids):
            raise ValueError(f"aux_layer_ids {c.aux_layer_ids}: a verify pass yields hidden_states indices in "
                             f"[0, {n}) of this {n}-layer target (index {n}, the last layer's pre-norm output, "
                             "is none of its outputs)")
        self.head = head.eval()
        self.feature_layers = tuple(c.aux_layer_ids)
        self.feat: torch.Tensor | None = None  # [R, S, 3Ht] the target's features at each committed slot
        self._root_h = self._fed_h = None  # the head's output features: the root's [R, H], fed nodes' [R, F, H]
        super().__init__(_HeadPass(self.head, int(tcfg.vocab_size)), vocab_size=int(tcfg.vocab_size),
                         compile=compile, cuda_graphs=cuda_graphs)

    @classmethod
    def from_pretrained(cls, path, target, aux_layer_ids=None, dtype: torch.dtype | None = None, device=None,
                        **kwargs) -> Eagle3Drafter:
        """A local EAGLE / SpecForge or speculators checkpoint (Eagle3Head.from_pretrained) as a drafter."""
        return cls(Eagle3Head.from_pretrained(path, target, aux_layer_ids, dtype, device), target, **kwargs)

    _pass_hidden = (0,)  # the drafting passes also return the head's output features (_HeadPass)

    def start(self, input_ids, pad=None, max_len=None, features=None) -> None:
        if features is None:
            raise ValueError("Eagle3Drafter drafts from the target's features: run it through SpeculativeDecoder, "
                             "whose verify passes provide them (features=[R, L, 3 x target hidden])")
        r, length = input_ids.shape
        size = max(self.max_len, -(-(max_len or length + 64) // 64) * 64)
        self.feat = features.new_zeros(r, size, features.shape[-1])
        self.feat[:, :length] = features
        # each row's first token is padding to the head: its input at slot s pairs the token at s with the target's
        # features of s - 1, and the first token has none (EAGLE trains on the sequence shifted by one, without it)
        super().start(input_ids, [p + 1 for p in (pad or [0] * r)], max_len)

    def accept(self, acc, live=None, features=None) -> None:
        """features [R, n, 3Ht]: the target's, of each row's path nodes first (root first), stored at their slots
        (the root's slot onwards); the accepted drafts are queued to be fed again with them."""
        c, n = self.cache, features.shape[1]
        live = [True] * c.rows if live is None else live
        slots = ((self._base_t - 1)[:, None] + torch.arange(n, device=self.device)).clamp(max=self.feat.shape[1] - 1)
        self.feat.scatter_(1, slots[..., None].expand(*slots.shape, self.feat.shape[-1]), features.to(self.feat))
        for b, alive in enumerate(live):
            if alive:
                c.lengths[b] = self._base[b]  # up to the root, which the first feed fed with the target's feature
                self.pending[b] = acc.tokens[b][1:]

    def skip(self, roots, live=None, features=None) -> None:
        """features [R, 1, 3Ht]: the roots' (verified alone), stored at the slot each root will be fed at."""
        live = [True] * len(roots) if live is None else live
        for b, alive in enumerate(live):
            if alive:
                self.feat[b, self.cache.lengths[b] + len(self.pending[b])] = features[b, 0].to(self.feat)
        super().skip(roots, live)

    def select(self, rows: list[int]) -> None:
        super().select(rows)
        self.feat = self.feat[torch.tensor(rows, device=self.feat.device)]

    def _feed_inputs(self, slots):
        """Committed tokens at slots [R, n] take the target's features of the slot before each (slot 0: a first
        token, which no query attends, start), through fc."""
        r, n = slots.shape
        prev = (slots - 1).clamp(min=0)
        return {"features": self.head.project(self.feat.gather(1, prev[..., None].expand(r, n, self.feat.shape[-1])))}

    def _run(self, tokens, positions, mask, slots, fed_parent=None, first_fed: int = 0, graph: bool = True):
        r, n = tokens.shape
        if fed_parent is None:  # committed tokens
            inputs = self._feed_inputs(slots)
        else:  # tree nodes: the head's own output feature of each one's parent
            hsize = self._root_h.shape[-1]
            fed = self._fed_h if self._fed_h is not None and self._fed_h.shape[0] == r else \
                self._root_h.new_zeros(r, 1, hsize)  # a first level: every parent is the root
            parent = fed.gather(1, fed_parent.clamp(min=0)[..., None].expand(r, n, hsize))
            inputs = {"features": torch.where((fed_parent < 0)[..., None], self._root_h[:, None], parent)}
        if graph:
            logits, h = self._passes()(self.cache, tokens, positions, mask, slots, inputs=inputs)
        else:
            logits, h = forward(self._run_model, self.cache, tokens, positions, mask, slots, self._cache_position,
                                self._pass_hidden, inputs)
        if fed_parent is None:
            self._root_h = h[:, -1].clone()  # the last token fed: the root (a replayed graph reuses h's storage)
        else:
            self._keep_fed(h, first_fed)
        return logits

    def _keep_fed(self, h: torch.Tensor, first: int) -> None:
        """The head's output features of fed nodes first .. first + n - 1 (the next level's parents)."""
        r, n, hsize = h.shape
        if self._fed_h is None or self._fed_h.shape[0] != r or self._fed_h.shape[1] < first + n:
            grown = h.new_zeros(r, max(first + n, 16), hsize)
            if self._fed_h is not None and self._fed_h.shape[0] == r:
                grown[:, : self._fed_h.shape[1]] = self._fed_h
            self._fed_h = grown
        self._fed_h[:, first : first + n] = h
