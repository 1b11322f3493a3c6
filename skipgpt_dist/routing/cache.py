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


class RoutedCacheLayer(DynamicLayer):
    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.key_pos: Optional[torch.Tensor] = None
        self.key_valid: Optional[torch.Tensor] = None
        self.seen = 0

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.is_initialized = True

    def append(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor,
               new_tokens: int) -> None:
        """Store the entries of (B, H, L, D) keys/values where keep (B, L) is true, compacted per row."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        counts = keep.sum(dim=1)
        width = int(counts.max()) if keep.numel() else 0
        length = keep.shape[1]
        order = torch.where(keep, torch.arange(length, device=keep.device), length + torch.arange(
            length, device=keep.device)).argsort(dim=1)[:, :width]
        gather = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        new = (keys.gather(2, gather), values.gather(2, gather), pos.gather(1, order), keep.gather(1, order))
        if self.keys is None:
            self.keys, self.values, self.key_pos, self.key_valid = new
        else:
            self.keys = torch.cat([self.keys, new[0]], dim=2)
            self.values = torch.cat([self.values, new[1]], dim=2)
            self.key_pos = torch.cat([self.key_pos, new[2]], dim=1)
            self.key_valid = torch.cat([self.key_valid, new[3]], dim=1)
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
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() * 2

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is not None:
            for name in ("keys", "values", "key_pos", "key_valid"):
                tensor = getattr(self, name)
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))

    def reset(self) -> None:
        self.keys = self.values = self.key_pos = self.key_valid = None
        self.seen = 0
        self.is_initialized = False


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
