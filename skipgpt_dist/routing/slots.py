"""Token slots: gather the rows of the tokens a sublayer runs on, and scatter their outputs back.

Row-wise index_select / index_add on the flattened (B*S, ...) tensor; padding slots add into a spare row that is
dropped, so whatever they hold never reaches the output and gets zero gradient.
"""
from __future__ import annotations

from typing import Optional

import torch


def flat_index(idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, k) token indices -> (B*k,) row indices into the (B*S, ...) flattened tensor."""
    if idx.shape[0] == 1:
        return idx.reshape(-1)
    offsets = torch.arange(idx.shape[0], device=idx.device)[:, None] * seq_len
    return (idx + offsets).reshape(-1)


def row_or_spare(idx: torch.Tensor, real: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B*k,) row of each slot in the flattened (B*S + 1, ...) buffer of scatter_add_tokens: its token's row, or the
    spare row B*S for a padding slot."""
    return torch.where(real.reshape(-1), flat_index(idx, seq_len), idx.shape[0] * seq_len)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # Row-wise index_select on the flattened tensor: ~10x faster on CPU than gather with an index expanded
    # over the hidden dimension (forward and backward), same values.
    batch, seq_len = x.shape[:2]
    rows = x.reshape(batch * seq_len, *x.shape[2:]).index_select(0, flat_index(idx, seq_len))
    return rows.view(batch, idx.shape[1], *x.shape[2:])


def scatter_add_tokens(h: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """h with rows (B, k, d) added at token indices idx (B, k; distinct per row) where real (B, k) is set.

    Rows of padding slots (real False) are added to a scratch row that is dropped, so whatever they hold never
    reaches h (and they get zero gradient), without a masking pass over the rows. The result is the first B*S rows
    of that (B*S + 1)-row buffer (spare_row_buffer finds it again for the in-place MLP combine).
    """
    batch, seq_len, dim = h.shape
    n = batch * seq_len
    out = torch.cat([h.reshape(n, dim), h.new_zeros(1, dim)]).index_add_(0, row_or_spare(idx, real, seq_len),
                                                                          rows.reshape(-1, dim))
    return out[:n].view(batch, seq_len, dim)


def spare_row_buffer(h: torch.Tensor) -> Optional[torch.Tensor]:
    """The (B*S + 1, d) buffer whose first B*S rows are h, when h came from scatter_add_tokens (its last row is
    scratch), else None. Only asked for a tensor this block made itself (h_is_scratch)."""
    base = h._base
    batch, seq_len, dim = h.shape
    if base is None or base.shape != (batch * seq_len + 1, dim) or base.data_ptr() != h.data_ptr() \
            or not base.is_contiguous():
        return None
    return base
