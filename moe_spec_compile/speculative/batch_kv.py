"""Batched KV caches with a length per row, their tree masks, and device-side compaction.

forward(tokens [R, n], slots [R, n]) -> keys/values scattered at each row's slots -> accept ->
compact(order [R, n], start [R]) -> lengths += accepted (all rows in one index op per layer, no host loop)

Legend: R rows of the batch (a rows bucket), Hkv key/value heads, S cache slots (max_len), n tokens per row
of a pass, w tree slots, d head dim.

Row b of a left-padded batch holds its prompt at slots [0, L): slots [0, pad_b) are padding that no query
ever attends; slot s (s >= pad_b) is position s - pad_b (transformers' positions under left padding,
cumsum(attention_mask) - 1). Accepted tokens follow at slots L, L + 1, ... in order, so row b's prefix is
slots [pad_b, length_b). A pass writes row b's n tokens at slots length_b + j (j < n): each row writes at its
own offset, through one scatter per layer. Rows that finished keep their length (the decoder never advances
them) and stay in the batch until the decoder packs the live rows into a smaller rows bucket (``copy_rows``).
"""

from __future__ import annotations

import torch

from .kv import TreeCache, _additive, sliding_window_of

__all__ = ["BatchCache", "BatchMasks", "batch_tree_mask", "batch_forward", "batch_ancestors"]


class _BatchLayer:
    """One layer's [R, Hkv, S, d] key and value buffers, written at per-row slots."""

    is_sliding = False
    is_compileable = True

    def __init__(self, owner: BatchCache):
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
        self.keys.scatter_(2, slots[:, None, :, None].expand(r, h, n, key_states.shape[-1]), key_states)
        self.values.scatter_(2, slots[:, None, :, None].expand(r, h, n, value_states.shape[-1]), value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0

    def get_max_cache_shape(self) -> int:
        return self.owner.max_len

    get_max_length = get_max_cache_shape


class BatchCache(TreeCache):
    """A static [R, Hkv, S, d] KV cache per layer; ``slots`` [R, n] says where each row's next tokens go.

    ``lengths`` [R] (device, int64) is each row's end of prefix, ``pad`` [R] its left padding. The Cache API
    the models call comes from kv.TreeCache; models only read the cache's own length (0 here) when they get
    no position ids, and the decoder always passes them."""

    def __init__(self, num_layers: int, rows: int, max_len: int, device=None):
        self.rows, self.max_len, self.length = int(rows), int(max_len), 0
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.pad = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.layers = [_BatchLayer(self) for _ in range(num_layers)]
        self.layer_class_to_replicate = None
        self.offloading = False

    @classmethod
    def for_model(cls, model, rows: int, max_len: int, device=None) -> BatchCache:
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        return cls(cfg.num_hidden_layers, rows, max_len, device)

    def __repr__(self):
        return f"BatchCache(layers={len(self.layers)}, rows={self.rows}, max_len={self.max_len})"

    # write_at(slots [R, n]) comes from TreeCache: a fixed buffer when the shape matches (CUDA graphs)
    def compact(self, order: torch.Tensor, start: torch.Tensor) -> None:
        """Move slots ``start[b] + order[b, i]`` to ``start[b] + i`` in every row and layer, on the device.

        order [R, n]: each row's accepted nodes first (in path order), then the rest, so the window of n
        slots per row is rewritten whole (static shapes, no host read of how many were accepted); a row
        whose order is the identity is left as it is."""
        n = order.shape[1]
        src = start[:, None] + order  # [R, n]
        dst = start[:, None] + torch.arange(n, device=order.device)  # [R, n]
        for layer in self.layers:
            if layer.keys is None:
                continue
            for buf in (layer.keys, layer.values):
                r, h, _, d = buf.shape
                moved = buf.gather(2, src[:, None, :, None].expand(r, h, n, d))
                buf.scatter_(2, dst[:, None, :, None].expand(r, h, n, d), moved)

    def copy_rows(self, src: BatchCache, rows: torch.Tensor) -> None:
        """Row i of this cache := row rows[i] of src (i < len(rows)), lengths and padding included; the
        rows past len(rows) keep whatever they held (the decoder marks them dead). Buffers keep their
        addresses, so CUDA graphs captured on this cache stay valid."""
        m = rows.shape[0]
        for mine, theirs in zip(self.layers, src.layers):
            if theirs.keys is None:
                continue
            if mine.keys is None:
                mine.allocate(theirs.keys, theirs.values)
            mine.keys[:m].copy_(theirs.keys.index_select(0, rows))
            mine.values[:m].copy_(theirs.values.index_select(0, rows))
        self.lengths[:m].copy_(src.lengths.index_select(0, rows))
        self.pad[:m].copy_(src.pad.index_select(0, rows))

    def select(self, rows: torch.Tensor) -> BatchCache:
        """A new cache of len(rows) rows: row i = row rows[i] of this one (fresh buffers)."""
        out = BatchCache(len(self.layers), rows.shape[0], self.max_len, self.lengths.device)
        out.copy_rows(self, rows)
        return out


def batch_ancestors(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """anc [R, n, n] bool: anc[b, i, j] when node j is node i or one of its ancestors in row b's tree.

    parents [R, n] (-1 for the root). Device-side: climb the parent pointers max_depth times."""
    r, n = parents.shape
    dev = parents.device
    up = parents.clamp(min=0)
    cur = torch.arange(n, device=dev).expand(r, n)
    anc = torch.eye(n, dtype=torch.bool, device=dev).expand(r, n, n).clone()
    for _ in range(max_depth):
        cur = up.gather(1, cur)
        anc.scatter_(2, cur[..., None], True)
    return anc


def batch_tree_mask(anc: torch.Tensor, start: torch.Tensor, pad: torch.Tensor, max_len: int, dtype,
                    window: int | None = None, qpos: torch.Tensor | None = None,
                    kpos: torch.Tensor | None = None) -> torch.Tensor:
    """[R, 1, n, S] additive mask: query (b, i) attends row b's prefix slots [pad_b, start_b) and its tree
    slots start_b + j where anc[b, i, j].

    anc [R, n, w] bool; start, pad [R]. With a sliding window, slot s is visible from query (b, i) only
    when qpos[b, i] - pos_b(s) < window, pos_b(s) = s - pad_b on the prefix, kpos[b, s - start_b] on the
    tree slots (qpos [R, n], kpos [R, w])."""
    r, n, w = anc.shape
    dev = anc.device
    cols = torch.arange(max_len, device=dev)
    rel = cols[None, :] - start[:, None]  # [R, S] tree slot index, valid in [0, w)
    in_tree = (rel >= 0) & (rel < w)
    prefix = (cols[None, :] >= pad[:, None]) & (rel < 0)  # [R, S]
    tree = anc.gather(2, rel.clamp(0, w - 1)[:, None, :].expand(r, n, max_len)) & in_tree[:, None, :]
    allowed = prefix[:, None, :] | tree  # [R, n, S]
    if window is not None:
        key_pos = torch.where(in_tree, kpos.gather(1, rel.clamp(0, w - 1)), cols[None, :] - pad[:, None])
        allowed &= (qpos[:, :, None] - key_pos[:, None, :]) < window
    return _additive(allowed, dtype)[0, 0][:, None]


class BatchMasks:
    """Batched tree masks in the form a model takes: one 4-D tensor, or a dict by layer type when the
    model mixes sliding and full attention layers."""

    def __init__(self, model, max_len: int):
        self.window, self.layer_types = sliding_window_of(model.config)
        self.max_len = max_len
        self.dtype = next(model.parameters()).dtype

    def tree(self, anc, start, pad, qpos, kpos):
        full = batch_tree_mask(anc, start, pad, self.max_len, self.dtype)
        if self.window is None:
            return full
        sliding = batch_tree_mask(anc, start, pad, self.max_len, self.dtype, self.window, qpos, kpos)
        if self.layer_types is None:
            return sliding
        return {"full_attention": full, "sliding_attention": sliding}

    def prompt(self, pad: torch.Tensor, length: int):
        """The left-padded prompt [R, L] written at slots [0, L): causal over each row's real tokens; a
        padding query attends only itself (its output is never used; no row is fully masked)."""
        dev = pad.device
        idx = torch.arange(length, device=dev)
        causal = idx[None, :] <= idx[:, None]  # [L, L]
        real = idx[None, :] >= pad[:, None]  # [R, L]
        anc = (causal[None] & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=dev)[None]
        pos = (idx[None, :] - pad[:, None]).clamp(min=0)
        return self.tree(anc, torch.zeros_like(pad), pad, pos, pos)


def batch_forward(model, cache: BatchCache, tokens: torch.Tensor, positions: torch.Tensor, mask,
                  slots: torch.Tensor, cache_position: bool = False) -> torch.Tensor:
    """One pass of tokens [R, n] at positions [R, n], written at slots [R, n] -> logits [R, n, V]."""
    cache.write_at(slots)
    kwargs = {"cache_position": cache.slots[0]} if cache_position else {}
    out = model(input_ids=tokens, position_ids=positions, attention_mask=mask, past_key_values=cache,
                use_cache=True, **kwargs)
    return out.logits
