"""A pre-allocated KV cache whose write slots the decoder chooses, the tree attention masks, and compaction.

forward(tokens, slots) -> keys/values written at `slots` -> accept -> compact(accepted slots -> prefix end)

Legend: B batch (1), Hkv key/value heads, S cache slots (max_len), n tokens of the pass, d head dim.

The cache holds [B, Hkv, S, d] buffers per layer, allocated on the first write (so the shapes of any
family, e.g. DeepSeek-V3's separate key and value head dims, come from the model itself). Slots
[0, length) hold the accepted prefix in order, so slot j is position j; a pass writes its n tokens at
slots length .. length+n-1 and its keys attend through a 4-D additive mask over all S slots (static
shapes: one compiled graph per pass size). The model's own cache classes are not used because their
write position is internal state that moved between transformers versions (cache_position in older
releases, a cumulative length tensor in 5.2x); this class implements the `update(key, value, layer_idx,
...)` call every covered family makes, and ignores whatever cache kwargs a version passes along.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache

__all__ = ["TreeCache", "Masks", "tree_mask", "forward", "sliding_window_of", "takes_cache_position"]


class _Layer:
    """One layer's [B, Hkv, S, d] key and value buffers."""

    is_sliding = False
    is_compileable = True

    def __init__(self, owner: TreeCache):
        self.owner = owner
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.is_initialized = False

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:
            b, h, _, _ = key_states.shape
            s = self.owner.max_len
            self.keys = key_states.new_zeros(b, h, s, key_states.shape[-1])
            self.values = value_states.new_zeros(b, h, s, value_states.shape[-1])
            self.is_initialized = True
        slots = self.owner.slots  # [n] int64, set by the decoder before the forward
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_cache_shape(self) -> int:
        return self.owner.max_len

    get_max_length = get_max_cache_shape

    def reset(self) -> None:
        if self.keys is not None:
            self.keys.zero_()
            self.values.zero_()


class TreeCache(Cache):
    """A static KV cache for tree verification: ``cache.slots`` says where the next forward writes.

    ``length`` (a host int) is the accepted prefix; the decoder updates it after each acceptance.
    Models reading it (``get_seq_length``) only do so when they are not given position ids, which the
    decoder always passes."""

    def __init__(self, num_layers: int, max_len: int, device=None):
        self.max_len = int(max_len)
        self.length = 0
        self.slots = torch.zeros(1, dtype=torch.long, device=device)
        self.layers = [_Layer(self) for _ in range(num_layers)]
        self.layer_class_to_replicate = None
        self.offloading = False

    @classmethod
    def for_model(cls, model, max_len: int, device=None) -> TreeCache:
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        return cls(cfg.num_hidden_layers, max_len, device)

    # --- the Cache API the models call ---------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def get_max_length(self) -> int:
        return self.max_len

    @property
    def is_compileable(self) -> bool:
        return True

    @property
    def is_initialized(self) -> bool:
        return all(layer.is_initialized for layer in self.layers)

    def __len__(self):
        return len(self.layers)

    def __repr__(self):
        return f"TreeCache(layers={len(self.layers)}, max_len={self.max_len}, length={self.length})"

    # --- what the decoder does with it ---------------------------------------------------------
    def write_at(self, slots: torch.Tensor) -> None:
        """The next forward writes its n tokens at ``slots`` [n] (copied into a fixed buffer when the
        size matches, so a captured CUDA graph keeps reading the same address)."""
        if self.slots.shape == slots.shape:
            self.slots.copy_(slots)
        else:
            self.slots = slots.to(dtype=torch.long, device=self.slots.device).clone()

    def compact(self, order: torch.Tensor, start: int) -> None:
        """Move slots ``start + order[i]`` to ``start + i`` in every layer, all on the device.

        ``order`` [n]: the accepted nodes first (in path order), then the rest; the whole window of n
        slots is rewritten, so its size is static and no host round trip is needed to know how many
        were accepted. Slots past the accepted ones keep garbage that the masks never expose."""
        n = order.shape[0]
        dst = torch.arange(start, start + n, device=order.device)
        src = order + start
        for layer in self.layers:
            if layer.keys is None:
                continue
            layer.keys.index_copy_(2, dst, layer.keys.index_select(2, src))
            layer.values.index_copy_(2, dst, layer.values.index_select(2, src))

    def reset(self) -> None:
        self.length = 0
        for layer in self.layers:
            layer.reset()


def sliding_window_of(config) -> tuple[int | None, list[str] | None]:
    """(window, layer_types): the sliding window the model applies, and per-layer types when it mixes
    sliding and full attention layers (then masks go in as a dict, as the models accept)."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    types = getattr(cfg, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        types = None
    return window, list(types) if types is not None else None


def tree_mask(anc: torch.Tensor, prefix: int, max_len: int, dtype, window: int | None = None,
              qpos: torch.Tensor | None = None, kpos: torch.Tensor | None = None, out=None) -> torch.Tensor:
    """[1, 1, n, S] additive mask: query i attends the prefix slots [0, prefix) and the tree slots
    prefix + j where anc[i, j] (its ancestors and itself).

    anc [n, w] bool: rows are the pass's queries, columns the w tree slots from ``prefix`` on.
    With a sliding window, slot j is visible from query i only when qpos[i] - pos(j) < window, where
    pos(j) = j for prefix slots and kpos[j - prefix] for tree slots (qpos [n], kpos [w] positions).
    out: (allowed [n, S] bool, mask [1, 1, n, S]) buffers written in place (Masks keeps them per n); None
    allocates."""
    n, w = anc.shape
    dev = anc.device
    if out is None:
        out = (torch.empty(n, max_len, dtype=torch.bool, device=dev),
               torch.empty(1, 1, n, max_len, dtype=dtype, device=dev))
    allowed, mask = out
    allowed[:, :prefix] = True
    allowed[:, prefix:] = False
    allowed[:, prefix : prefix + w] = anc
    if window is not None:
        q = qpos.to(dev)[:, None]
        allowed[:, :prefix] &= (q - torch.arange(prefix, device=dev)[None, :]) < window
        allowed[:, prefix : prefix + w] &= (q - kpos.to(dev)[None, :]) < window
    # 0 where allowed, the dtype's minimum elsewhere (eager attention adds the mask to the scores, so a bool
    # mask would be wrong there; sdpa takes either)
    mask.fill_(torch.finfo(dtype).min)
    mask[0, 0].masked_fill_(allowed, 0)
    return mask


class Masks:
    """Tree masks in the form a model takes: one 4-D tensor, or a dict by layer type when the model
    mixes sliding and full attention layers (GPT-OSS; models accept a prepared dict).

    Tree passes of up to BUFFERED tokens (a verify bucket, a drafted level) and causal passes of up to
    CAUSAL_BUFFERED (a drafter's first feed of a step) write their masks into buffers kept per (n, kind) and
    allocated once: a mask is valid until the next mask of the same size from the same Masks (the decode loop uses
    each right away). Prompts get fresh tensors (their lengths vary: buffers per length would pile up)."""

    BUFFERED = 256
    CAUSAL_BUFFERED = 16

    def __init__(self, model, max_len: int):
        self.window, self.layer_types = sliding_window_of(model.config)
        self.max_len = max_len
        self.dtype = next(model.parameters()).dtype
        self._buffers: dict[tuple[int, str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._tril: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _out(self, n: int, kind: str, device, limit: int):
        if n > limit:
            return None
        key = (n, kind, torch.device(device))
        if key not in self._buffers:
            self._buffers[key] = (torch.empty(n, self.max_len, dtype=torch.bool, device=device),
                                  torch.empty(1, 1, n, self.max_len, dtype=self.dtype, device=device))
        return self._buffers[key]

    def tree(self, anc: torch.Tensor, prefix: int, qpos: torch.Tensor, kpos: torch.Tensor):
        return self._masks(anc, prefix, qpos, kpos, self.BUFFERED)

    def _masks(self, anc, prefix: int, qpos, kpos, limit: int):
        n, dev = anc.shape[0], anc.device
        full = tree_mask(anc, prefix, self.max_len, self.dtype, out=self._out(n, "full", dev, limit))
        if self.window is None:
            return full
        sliding = tree_mask(anc, prefix, self.max_len, self.dtype, self.window, qpos, kpos,
                            out=self._out(n, "sliding", dev, limit))
        if self.layer_types is None:
            return sliding
        return {"full_attention": full, "sliding_attention": sliding}

    def causal(self, n: int, prefix: int, device):
        """A plain causal pass of n tokens written at slots prefix .. prefix+n-1."""
        key = (n, torch.device(device))
        anc = self._tril.get(key)
        if anc is None:
            anc = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            if n <= self.CAUSAL_BUFFERED:
                self._tril[key] = anc
        pos = prefix + torch.arange(n, device=device)
        return self._masks(anc, prefix, pos, pos, self.CAUSAL_BUFFERED)


def takes_cache_position(model) -> bool:
    """Older transformers releases (before cache positions were removed) take ``cache_position``."""
    model = getattr(model, "_orig_mod", model)
    return "cache_position" in inspect.signature(model.forward).parameters


def forward(model, cache: TreeCache, tokens: torch.Tensor, positions: torch.Tensor, mask,
            slots: torch.Tensor, cache_position: bool = False) -> torch.Tensor:
    """One pass of tokens [n] at positions [n], written at slots [n] -> logits [n, V]."""
    cache.write_at(slots)
    kwargs = {"cache_position": cache.slots} if cache_position else {}
    out = model(input_ids=tokens[None], position_ids=positions[None], attention_mask=mask,
                past_key_values=cache, use_cache=True, **kwargs)
    return out.logits[0]


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """bool [n, S] -> [1, 1, n, S] with 0 where allowed and the dtype's minimum elsewhere (eager
    attention adds the mask to the scores, so a bool mask would be wrong there; sdpa takes either)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
