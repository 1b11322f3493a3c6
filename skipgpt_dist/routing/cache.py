"""A KV-cache layer for routed attention that fits Hugging Face's Cache container.

It keeps, per row, only the keys/values that later queries may attend (padding dropped; under
kv_policy=routed, also the tokens that skipped attention), with each entry's position. Rows are padded to the
longest row with invalid entries. It reports the number of tokens SEEN as its sequence length, so HF's position
bookkeeping in generate() stays that of the dense model while memory follows the executed tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import DynamicLayer


# Entries of headroom at least, when the key/value append buffers are (re)allocated.
KV_BUFFER_MIN_HEADROOM = 16


class RoutedCacheLayer(DynamicLayer):
    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self._key_pos: Optional[torch.Tensor] = None
        self._key_valid: Optional[torch.Tensor] = None
        self.seen = 0
        self.all_valid = True  # every stored entry is valid (no row padding): attention then needs no key mask
        # Entry i of every row is token i, valid (nothing dropped, no padding: kv_policy=all on unpadded batches).
        # Positions and flags are then implied and not stored: two concatenations fewer per layer and token.
        self.contiguous = True
        # Inference appends write into preallocated key/value buffers with headroom (keys/values are views of
        # their first `seen` entries): one token's entries are copied per step, not the whole cache as with cat
        # (which also hands every layer a fresh multi-page allocation per token).
        self._buffers: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._buffered = 0  # entries the buffers hold
        # append may read which entries are kept on the host to compact them (set per forward by the routed block:
        # CPU eager, dynamic inference slots). Without it entries are stored as they come, with their flags: no
        # host sync, shapes fixed by the token count (kv_policy=routed then saves compute, not cache memory).
        self.host_reads = True

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.is_initialized = True

    @property
    def key_pos(self) -> Optional[torch.Tensor]:
        """(B, L) position of each stored entry."""
        if self.contiguous and self.keys is not None:
            return torch.arange(self.keys.shape[2], device=self.keys.device).expand(self.keys.shape[0], -1)
        return self._key_pos

    @property
    def key_valid(self) -> Optional[torch.Tensor]:
        """(B, L) entry is real (rows are padded to the longest with invalid entries)."""
        if self.contiguous and self.keys is not None:
            return torch.ones(self.keys.shape[0], self.keys.shape[2], dtype=torch.bool, device=self.keys.device)
        return self._key_valid

    def append(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor,
               new_tokens: int, all_kept: bool = False) -> None:
        """Store the entries of (B, H, L, D) keys/values where keep (B, L) is true, compacted per row.

        all_kept: the caller knows keep is all true (saves a check at every decode step).
        """
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        if all_kept:
            new, rows_even = (keys, values, pos, keep), True
        elif not self.host_reads:
            new, rows_even = (keys, values, pos, keep), False  # flagged, not compacted: keep is never read
        else:
            new, all_kept, rows_even = _compacted(keys, values, pos, keep)
        self.all_valid = self.all_valid and rows_even
        # One entry per new token, all kept: entry index stays == position (the block's positions are seen + i)
        if not (self.contiguous and all_kept and keep.shape[1] == new_tokens):
            self._spell_out()
        if self.keys is None:
            self.keys, self.values = new[0], new[1]
        elif torch.is_grad_enabled():
            # Autograd may save the returned keys for a backward pass: later appends must not write into them.
            self.keys = torch.cat([self.keys, new[0]], dim=2)
            self.values = torch.cat([self.values, new[1]], dim=2)
        else:
            self.keys, self.values = self._buffered_append(new[0], new[1])
        if not self.contiguous:
            self._key_pos = new[2] if self._key_pos is None else torch.cat([self._key_pos, new[2]], dim=1)
            self._key_valid = new[3] if self._key_valid is None else torch.cat([self._key_valid, new[3]], dim=1)
        self.seen += new_tokens

    def _live_buffers(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The append buffers, if keys/values are still their views (same storage, same length); anything that
        replaced keys/values (reorder_cache, HF's crop or batch selection) leaves them stale."""
        buffers = self._buffers
        if (buffers is None or self.keys is None or self._buffered != self.keys.shape[2]
                or buffers[0].data_ptr() != self.keys.data_ptr() or buffers[1].data_ptr() != self.values.data_ptr()):
            return None
        return buffers

    def _buffered_append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) with the new entries after the stored ones, written into the buffers (new ones when stale
        or full)."""
        stored, needed = self.keys.shape[2], self.keys.shape[2] + keys.shape[2]
        buffers = self._live_buffers()
        if buffers is None or buffers[0].shape[2] < needed:
            # Headroom of 1/8 of the length (at least KV_BUFFER_MIN_HEADROOM entries): a regrow copies the cache
            # once per length/8 appended tokens, and at most ~1/8 more memory is reserved than used.
            capacity = needed + max(KV_BUFFER_MIN_HEADROOM, needed // 8)
            buffers = tuple(t.new_empty(*t.shape[:2], capacity, t.shape[3]) for t in (self.keys, self.values))
            buffers[0][:, :, :stored] = self.keys
            buffers[1][:, :, :stored] = self.values
            self._buffers = buffers
        buffers[0][:, :, stored:needed] = keys
        buffers[1][:, :, stored:needed] = values
        self._buffered = needed
        return buffers[0][:, :, :needed], buffers[1][:, :, :needed]

    def reserved_bytes(self) -> int:
        """Bytes allocated: stored_bytes plus the unused headroom of the append buffers."""
        buffers = self._live_buffers()
        headroom = 0 if buffers is None else sum(b[:, :, self._buffered:].numel() * b.element_size() for b in buffers)
        return self.stored_bytes() + headroom

    def _spell_out(self) -> None:
        """Leave contiguous mode: store the implied positions and flags of the entries so far."""
        if self.contiguous:
            self._key_pos, self._key_valid = self.key_pos, self.key_valid
            self.contiguous = False

    def advance(self, new_tokens: int) -> None:
        """new_tokens were seen and none of them stores a key/value here (kv_policy=routed, all skipped)."""
        self._spell_out()
        self.seen += new_tokens

    def past(self):
        """(keys, values, key_pos, key_valid) stored so far, or None."""
        if self.keys is None:
            return None
        return self.keys, self.values, self.key_pos, self.key_valid

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("RoutedCacheLayer is filled by routed layers through append(); a non-routed layer "
                           "must not share it")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def stored_bytes(self) -> int:
        """Bytes of the stored entries: keys and values, and the positions and flags when stored (not in contiguous
        mode). The append buffers' unused headroom is not counted (reserved_bytes counts it)."""
        held = (self.keys, self.values, self._key_pos, self._key_valid)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in ("keys", "values", "_key_pos", "_key_valid"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))

    def reset(self) -> None:
        self.keys = self.values = self._key_pos = self._key_valid = None
        self._buffers, self._buffered = None, 0
        self.seen = 0
        self.all_valid = True
        self.contiguous = True
        self.is_initialized = False


def _compacted(keys, values, pos, keep):
    """The entries where keep is set, moved to the front of each row (original order), rows cut to the longest.

    Returns (entries, whether every entry is kept, whether every row keeps as many: then no row is padded).
    """
    length = keep.shape[1]
    if keep.numel() == 1:  # batch-1 decode: one entry
        low = width = int(keep.item())
    else:
        low, width = (int(v) for v in torch.aminmax(keep.sum(dim=1))) if keep.numel() else (0, 0)
    if low == length:  # every entry kept: nothing to move
        return (keys, values, pos, keep), True, True
    order = torch.where(keep, torch.arange(length, device=keep.device), length + torch.arange(
        length, device=keep.device)).argsort(dim=1)[:, :width]
    gather = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
    new = keys.gather(2, gather), values.gather(2, gather), pos.gather(1, order), keep.gather(1, order)
    return new, False, low == width


def routed_cache_layer(cache, layer_idx: int) -> RoutedCacheLayer:
    """The RoutedCacheLayer for layer_idx inside an HF Cache, swapping out an unused default layer."""
    layers = cache.layers
    while len(layers) <= layer_idx:
        layers.append(RoutedCacheLayer())
    layer = layers[layer_idx]
    if not isinstance(layer, RoutedCacheLayer):
        if layer.get_seq_length() > 0:
            raise RuntimeError("the KV cache already holds dense keys for a routed layer: start generation "
                               "with a fresh cache after attach_routers")
        layer = layers[layer_idx] = RoutedCacheLayer()
    return layer
