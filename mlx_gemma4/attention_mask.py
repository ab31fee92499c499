"""Attention masks, built as the reference's `create_causal_mask` / `create_masks_for_vision_model` build them.

Without vision blocks, full-attention layers are causal and sliding layers causal within the window. With them (the
prompt says which tokens are image or video tokens), the reference's forward ORs "same vision block" onto both
kinds, after the window: `masking_utils.create_causal_mask` / `create_sliding_window_causal_mask` with
`block_sequence_ids`, which is what `Gemma4UnifiedModel.forward` (and so `generate` with its default cache) uses.
The `create_masks_for_vision_model` docstring (sliding layers only, window over everything) describes only the
static-cache path of `generate`; the logits of a plain forward follow the former, and so do we.
"""

from typing import Optional

import mlx.core as mx

VISION_TOKEN_TYPES = (1, 2)  # image, video in mm_token_type_ids (3 is audio, 0 text)


class PositionMask:
    """The mask for `query_length` new tokens starting at position `offset`: causal, within `window` on sliding
    layers (None on full layers, which need an array mask only when vision blocks open them up).

    A rotating cache hands back a variable number of keys (up to window - 1 old ones plus the new ones), so the mask
    is made once the key count is known; the keys are always the most recent positions, in order.
    """

    def __init__(self, offset: int, query_length: int, window: Optional[int], block_ids: Optional[mx.array] = None):
        self.offset = offset
        self.query_length = query_length
        self.window = window
        self.block_ids = block_ids
        self._by_key_length = {}

    def __call__(self, key_length: int) -> mx.array:
        if key_length not in self._by_key_length:
            self._by_key_length[key_length] = self._build(key_length)
        return self._by_key_length[key_length]

    def _build(self, key_length: int) -> mx.array:
        return self._visible(key_length, 0, key_length)

    def columns(self, key_length: int, start: int, stop: int) -> Optional[mx.array]:
        """Columns start:stop of the mask for `key_length` keys (blockwise attention), or None when every query
        sees every one of those keys."""
        first_key = self.offset + self.query_length - key_length
        if self.window is None and self.block_ids is None and first_key + stop - 1 <= self.offset:
            return None
        return self._visible(key_length, start, stop)

    def _visible(self, key_length: int, start: int, stop: int) -> mx.array:
        end = self.offset + self.query_length
        query_positions = mx.arange(self.offset, end)[:, None]
        key_positions = mx.arange(end - key_length + start, end - key_length + stop)[None]
        visible = key_positions <= query_positions
        if self.window is not None:
            visible = visible & (key_positions > query_positions - self.window)
        if self.block_ids is not None:
            visible = visible | same_block(self.block_ids, key_length, start, stop)
        return visible


def same_block(block_ids: mx.array, key_length: int, start: int = 0, stop: Optional[int] = None) -> mx.array:
    """True where query and key belong to one vision block, for keys start:stop of `key_length`. `block_ids` covers
    the new tokens only: a prompt is never split inside a block, so older keys are never in a query's block.
    `block_ids` is (length,) or (batch, length); the result broadcasts against (batch, heads, queries, keys)."""
    stop = key_length if stop is None else stop
    query_length = block_ids.shape[-1]
    older = key_length - query_length
    own = block_ids[..., max(start - older, 0) : max(stop - older, 0)]
    filler = mx.full((*block_ids.shape[:-1], stop - start - own.shape[-1]), -1, dtype=block_ids.dtype)
    key_blocks = mx.concatenate([filler, own], axis=-1)
    queries = block_ids[..., :, None]
    same = (queries == key_blocks[..., None, :]) & (queries >= 0)
    return same if block_ids.ndim == 1 else same[:, None]


def vision_block_ids(mm_token_type_ids: mx.array) -> mx.array:
    """Number each run of vision tokens (image or video) 0, 1, 2...; every other token gets -1."""
    is_vision = (mm_token_type_ids == VISION_TOKEN_TYPES[0]) | (mm_token_type_ids == VISION_TOKEN_TYPES[1])
    previous = mx.concatenate([mx.zeros_like(is_vision[..., :1]), is_vision[..., :-1]], axis=-1)
    starts = is_vision & ~previous
    group = mx.cumsum(starts.astype(mx.int32), axis=-1) - 1
    return mx.where(is_vision, group, -1)
