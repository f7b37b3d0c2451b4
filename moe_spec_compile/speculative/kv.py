"""A pre-allocated KV cache with a length per row whose write slots the decoder chooses, tree masks, compaction.

forward(tokens [R, n], slots [R, n]) -> keys/values written at each row's slots -> accept ->
compact(order [R, n], start [R]) -> lengths[b] += accepted (one index op per layer for all rows, no host loop)

Legend: R rows (a rows bucket; 1 for one sequence), Hkv key/value heads, S cache slots (max_len), n tokens per row
of a pass, w tree slots, d head dim.

The cache holds [R, Hkv, S, d] buffers per layer, allocated on the first write (so the shapes of any family, e.g.
DeepSeek-V3's separate key and value head dims, come from the model itself). Row b of a left-padded batch holds
its prompt at slots [0, L): slots [0, pad_b) are padding that no query attends; slot s (s >= pad_b) is position
s - pad_b (transformers' positions under left padding). Accepted tokens follow in order, so row b's prefix is slots
[pad_b, lengths[b]). A pass writes row b's n tokens at slots lengths[b] + j; its queries attend through a 4-D
additive mask over all S slots (static shapes: one compiled graph per pass shape). ``lengths`` is a host list: the
decoder learns each step's accepted lengths in its one host read, and builds the pass's device inputs from it.
The model's own cache classes are not used because their write position is internal state that moved between
transformers versions; this class implements the ``update(key, value, layer_idx, ...)`` call every covered family
makes, and ignores whatever cache kwargs a version passes along.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache

__all__ = ["TreeCache", "Masks", "tree_mask", "forward", "sliding_window_of", "takes_cache_position", "cache_keyword"]


class _Layer:
    """One layer's [R, Hkv, S, d] key and value buffers, written at per-row slots."""

    is_sliding = False
    is_compileable = True

    def __init__(self, owner: TreeCache):
        self.owner = owner
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.is_initialized = False

    def allocate(self, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        r, h, s = self.owner.rows, key_like.shape[1], self.owner.max_len
        self.keys = key_like.new_zeros(r, h, s, key_like.shape[-1])
        self.values = value_like.new_zeros(r, h, s, value_like.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:
            self.allocate(key_states, value_states)
        slots = self.owner.slots  # [R, n] int64, set by the decoder before the forward
        r, h, n, _ = key_states.shape
        if r == 1:  # one row: an index copy along the slots (cheaper than a scatter)
            self.keys.index_copy_(2, slots[0], key_states)
            self.values.index_copy_(2, slots[0], value_states)
        else:
            self.keys.scatter_(2, slots[:, None, :, None].expand(r, h, n, key_states.shape[-1]), key_states)
            self.values.scatter_(2, slots[:, None, :, None].expand(r, h, n, value_states.shape[-1]), value_states)
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
    """A static KV cache for tree verification of R rows: ``slots`` [R, n] says where the next forward writes.

    ``lengths`` (host ints, one per row) is each row's end of prefix, ``pad`` its left padding (host ints, and
    ``pad_t`` [R] on the device).
    Models read the cache's own length only when they get no position ids, which the decoder always passes."""

    def __init__(self, num_layers: int, max_len: int, device=None, rows: int = 1):
        self.rows, self.max_len = int(rows), int(max_len)
        self.lengths = [0] * self.rows
        self.pad = [0] * self.rows
        self.pad_t = torch.zeros(self.rows, dtype=torch.long, device=device)
        self.slots = torch.zeros(self.rows, 1, dtype=torch.long, device=device)
        self.layers = [_Layer(self) for _ in range(num_layers)]
        self.layer_class_to_replicate = None
        self.offloading = False

    @classmethod
    def for_model(cls, model, max_len: int, device=None, rows: int = 1) -> TreeCache:
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        return cls(cfg.num_hidden_layers, max_len, device, rows)

    @property
    def length(self) -> int:
        """The longest row's prefix (a single row's length)."""
        return max(self.lengths)

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
        return f"TreeCache(layers={len(self.layers)}, rows={self.rows}, max_len={self.max_len}, lengths={self.lengths})"

    # --- what the decoder does with it ---------------------------------------------------------
    def write_at(self, slots: torch.Tensor) -> None:
        """The next forward writes row b's n tokens at ``slots[b]`` (copied into a fixed buffer when the shape
        matches, so a captured CUDA graph keeps reading the same address)."""
        if self.slots.shape == slots.shape:
            self.slots.copy_(slots)
        else:
            self.slots = slots.to(dtype=torch.long, device=self.slots.device).clone()

    def compact(self, order: torch.Tensor, start: torch.Tensor) -> None:
        """Move slots ``start[b] + order[b, i]`` to ``start[b] + i`` in every row and layer, on the device.

        order [R, n]: each row's accepted nodes first (in path order), then the rest, so the window of n slots per
        row is rewritten whole (static shapes, no host read of how many were accepted); start [R] (device)."""
        n = order.shape[1]
        src = start[:, None] + order  # [R, n]
        dst = start[:, None] + torch.arange(n, device=order.device)  # [R, n]
        for layer in self.layers:
            if layer.keys is None:
                continue
            for buf in (layer.keys, layer.values):
                if buf.shape[0] == 1:
                    buf.index_copy_(2, dst[0], buf.index_select(2, src[0]))
                    continue
                r, h, _, d = buf.shape
                moved = buf.gather(2, src[:, None, :, None].expand(r, h, n, d))
                buf.scatter_(2, dst[:, None, :, None].expand(r, h, n, d), moved)

    def copy_rows(self, src: TreeCache, rows: list[int]) -> None:
        """Row i of this cache := row rows[i] of src (i < len(rows)), lengths and padding included; the rows past
        len(rows) keep what they held (the decoder marks them dead). Buffers keep their addresses, so CUDA graphs
        captured on this cache stay valid."""
        m, idx = len(rows), torch.tensor(rows, device=src.pad_t.device)
        for mine, theirs in zip(self.layers, src.layers):
            if theirs.keys is None:
                continue
            if mine.keys is None:
                mine.allocate(theirs.keys, theirs.values)
            mine.keys[:m].copy_(theirs.keys.index_select(0, idx))
            mine.values[:m].copy_(theirs.values.index_select(0, idx))
        self.lengths[:m] = [src.lengths[i] for i in rows]
        self.pad[:m] = [src.pad[i] for i in rows]
        self.pad_t[:m].copy_(src.pad_t.index_select(0, idx))

    def set_pad(self, pad: list[int]) -> None:
        self.pad = list(pad)
        self.pad_t.copy_(torch.tensor(self.pad))

    def reset(self) -> None:
        self.lengths = [0] * self.rows
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


def tree_mask(anc: torch.Tensor, start: list[int], pad: list[int], max_len: int, dtype,
              window: int | None = None, qpos: torch.Tensor | None = None, kpos: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """[R, 1, n, S] additive mask: query (b, i) attends row b's prefix slots [pad[b], start[b]) and its tree slots
    start[b] + j where anc[b, i, j] (its ancestors and itself).

    anc [R, n, w] bool; start, pad: host ints per row. With a sliding window, slot s is visible from query (b, i)
    only when qpos[b, i] - pos_b(s) < window, pos_b(s) = s - pad[b] on the prefix, kpos[b, s - start[b]] on the tree
    slots (qpos [R, n], kpos [R, w]). out: an [R, 1, n, S] buffer written in place (Masks keeps them); None
    allocates. One row without a window is written by slices (three ops); otherwise on the device for all rows."""
    r, n, w = anc.shape
    dev = anc.device
    if out is None:
        out = torch.empty(r, 1, n, max_len, dtype=dtype, device=dev)
    # 0 where allowed, the dtype's minimum elsewhere (eager attention adds the mask to the scores, so a bool
    # mask would be wrong there; sdpa takes either)
    out.fill_(torch.finfo(dtype).min)
    if r == 1 and window is None:
        out[0, 0, :, pad[0] : start[0]] = 0
        out[0, 0, :, start[0] : start[0] + w].masked_fill_(anc[0], 0)
        return out
    start_t, pad_t = torch.tensor(start, device=dev), torch.tensor(pad, device=dev)
    cols = torch.arange(max_len, device=dev)
    rel = cols[None, :] - start_t[:, None]  # [R, S] tree slot index, valid in [0, w)
    in_tree = (rel >= 0) & (rel < w)
    allowed = anc.gather(2, rel.clamp(0, w - 1)[:, None, :].expand(r, n, max_len))  # [R, n, S]
    allowed &= in_tree[:, None, :]
    allowed |= ((cols[None, :] >= pad_t[:, None]) & (rel < 0))[:, None, :]
    if window is not None:
        key_pos = torch.where(in_tree, kpos.gather(1, rel.clamp(0, w - 1)), cols[None, :] - pad_t[:, None])
        allowed &= (qpos[:, :, None] - key_pos[:, None, :]) < window
    out[:, 0].masked_fill_(allowed, 0)
    return out


class Masks:
    """Tree masks in the form a model takes: one 4-D tensor, or a dict by layer type when the model mixes sliding
    and full attention layers (GPT-OSS; models accept a prepared dict).

    Passes of up to BUFFERED tokens per row (a verify bucket, a drafted level, a drafter's feed) write their masks
    into buffers kept per (R, n, kind) and allocated once: a mask is valid until the next mask of the same shape
    from the same Masks (the decode loop uses each right away). Prompts get fresh tensors (their lengths vary)."""

    BUFFERED = 256

    def __init__(self, model, max_len: int):
        self.window, self.layer_types = sliding_window_of(model.config)
        self.max_len = max_len
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self._buffers: dict[tuple, torch.Tensor] = {}

    def _out(self, r: int, n: int, kind: str, device, buffered: bool):
        if not buffered or n > self.BUFFERED:
            return None
        key = (r, n, kind, torch.device(device))
        if key not in self._buffers:
            self._buffers[key] = torch.empty(r, 1, n, self.max_len, dtype=self.dtype, device=device)
        return self._buffers[key]

    def tree(self, anc: torch.Tensor, start: list[int], pad: list[int], qpos: torch.Tensor | None,
             kpos: torch.Tensor | None, buffered: bool = True):
        """anc [R, n, w] written at slots start[b] .. (host ints; tree_mask) -> the mask(s). qpos, kpos: the
        positions, read only with a sliding window."""
        r, n, dev = anc.shape[0], anc.shape[1], anc.device
        full = tree_mask(anc, start, pad, self.max_len, self.dtype, out=self._out(r, n, "full", dev, buffered))
        if self.window is None:
            return full
        sliding = tree_mask(anc, start, pad, self.max_len, self.dtype, self.window, qpos, kpos,
                            out=self._out(r, n, "sliding", dev, buffered))
        if self.layer_types is None:
            return sliding
        return {"full_attention": full, "sliding_attention": sliding}

    def causal(self, first: torch.Tensor, pad: torch.Tensor, n: int = 1, buffered: bool = False):
        """n queries per row at slots first[b] .. first[b] + n - 1 after a contiguous prefix (a drafter's first feed,
        a chain's steps): query i attends slots [min(pad[b], first[b]), first[b] + i] (its prefix, itself and the
        queries before it, as tree_mask: a re-fed padding token is never fully masked); first, pad [R] on the device
        -> the mask(s) [R, 1, n, S], device ops only (no host ints, so a compiled chain computes it inside its
        graph). buffered: written into this Masks' buffers for (R, n), as tree masks are (eager passes); else fresh
        tensors (inside a compiled graph). Slot s is position s - pad[b] throughout, so the sliding window keeps
        (first[b] + i) - s < window (tree_mask's rule)."""
        r, dev = first.shape[0], first.device
        cols = torch.arange(self.max_len, device=dev)
        last = (first[:, None] + torch.arange(n, device=dev))[:, None, :, None]  # [R, 1, n, 1]
        allowed = (cols >= torch.minimum(pad, first)[:, None, None, None]) & (cols <= last)  # [R, 1, n, S]
        low = torch.finfo(self.dtype).min

        def write(kind, ok):
            out = self._out(r, n, kind, dev, buffered)
            if out is None:
                return torch.zeros(ok.shape, dtype=self.dtype, device=dev).masked_fill(~ok, low)
            return out.fill_(low).masked_fill_(ok, 0)

        full = write("full", allowed)
        if self.window is None:
            return full
        sliding = write("sliding", allowed & ((last - cols) < self.window))
        if self.layer_types is None:
            return sliding
        return {"full_attention": full, "sliding_attention": sliding}

    def prompt(self, pad: list[int], length: int):
        """The left-padded prompts [R, L] written at slots [0, L): causal over each row's real tokens; a padding
        query attends only itself (its output is never used; no row is fully masked)."""
        dev = self.device
        idx = torch.arange(length, device=dev)
        pad_t = torch.tensor(pad, device=dev)
        real = idx[None, :] >= pad_t[:, None]  # [R, L]
        anc = ((idx[None, :] <= idx[:, None])[None] & real[:, None, :]) | torch.eye(length, dtype=torch.bool,
                                                                                     device=dev)[None]
        pos = (idx[None, :] - pad_t[:, None]).clamp(min=0)
        return self.tree(anc, [0] * len(pad), pad, pos, pos, buffered=False)


_FORWARD_PARAMS: dict[type, frozenset] = {}


def _forward_params(model) -> frozenset:
    """The parameter names of a model's forward (through transformers' decorators), looked up once per class."""
    cls = type(getattr(model, "_orig_mod", model))
    params = _FORWARD_PARAMS.get(cls)
    if params is None:
        params = _FORWARD_PARAMS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return params


def takes_cache_position(model) -> bool:
    """Older transformers releases (before cache positions were removed) take ``cache_position``."""
    return "cache_position" in _forward_params(model)


def cache_keyword(model) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` where transformers renamed it (5.25 warns on
    every call with ``past_key_values`` and removes that name in 5.40), else ``past_key_values`` (older releases,
    e.g. 5.17, and modules of our own such as the EAGLE-3 head)."""
    params = _forward_params(model)
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def forward(model, cache: TreeCache, tokens: torch.Tensor, positions: torch.Tensor, mask,
            slots: torch.Tensor, cache_position: bool = False, hidden: tuple[int, ...] | None = None,
            inputs: dict | None = None):
    """One pass of tokens [R, n] at positions [R, n], written at slots [R, n] -> logits [R, n, V]; with hidden
    (hidden_states indices): (logits, those hidden states concatenated [R, n, F]) from the same pass. inputs: more
    keyword arguments of the model (an EAGLE-3 head's features)."""
    cache.write_at(slots)
    kwargs = {"cache_position": cache.slots[0]} if cache_position else {}
    if hidden is not None:
        kwargs["output_hidden_states"] = True
    kwargs[cache_keyword(model)] = cache
    out = model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True, **kwargs,
                **(inputs or {}))
    if hidden is None:
        return out.logits
    return out.logits, torch.cat([out.hidden_states[i] for i in hidden], dim=-1)
