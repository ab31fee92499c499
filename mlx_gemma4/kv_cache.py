"""The target's key/value caches, laid out so that a one-token step has the same array shapes every time and can run
as one compiled function (decode_step.py), in plain generation and in the speculative loop alike.

A sliding layer keeps a ring of slots (the window, or a little more where drafts are rolled back), position p in
slot p % slots, so a step writes one slot and reads the whole ring; a full layer keeps its keys in position order in a buffer that only grows, so a step writes one
row and reads the buffer, masking the rows not yet written. Outside a compiled step both behave as mlx-lm's
RotatingKVCache and KVCache do: a prompt chunk gets its keys in position order, a sliding one with the window - 1
earlier keys before its own.
"""

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache


class WindowCache:
    """A sliding-window layer's keys and values in a ring of `slots` slots (the window, or more when positions must
    be rolled back: the speculative loop trims rejected drafts by moving `offset` back, and the slots it frees
    still hold the window's oldest keys)."""

    def __init__(self, window: int, slots: Optional[int] = None):
        self.window = window
        self.slots = slots or window
        self.keys = self.values = None
        self.offset = 0  # positions seen

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.keys is None:
            self.keys = mx.zeros((*keys.shape[:2], self.slots, keys.shape[3]), keys.dtype)
            self.values = mx.zeros((*values.shape[:2], self.slots, values.shape[3]), values.dtype)
        if keys.shape[2] == 1 and self.slots == self.window:
            # One query sees every key it could: softmax does not care about their order, so the ring is read as
            # it lies (only its written slots until it first fills).
            slot = self.offset % self.slots
            self.keys[..., slot : slot + 1, :] = keys
            self.values[..., slot : slot + 1, :] = values
            self.offset += 1
            visible = min(self.offset, self.slots)
            return self.keys[..., :visible, :], self.values[..., :visible, :]
        length = keys.shape[2]
        earlier = min(self.offset, self.window - 1)
        if earlier + length <= self.slots:
            # The ring holds the earlier keys and the new ones together: write, then read them back in order (a
            # view of the ring unless they wrap around its end).
            self.offset += length
            self.keys, self.values = self._written(self.keys, keys), self._written(self.values, values)
            return self._in_order(self.keys, earlier + length), self._in_order(self.values, earlier + length)
        if earlier:
            keys = mx.concatenate([self._in_order(self.keys, earlier), keys], axis=2)
            values = mx.concatenate([self._in_order(self.values, earlier), values], axis=2)
        self.offset += length
        self.keys, self.values = self._written(self.keys, keys), self._written(self.values, values)
        return keys, values

    def _in_order(self, ring: mx.array, count: int) -> mx.array:
        """The last `count` positions' rows, oldest first."""
        start = (self.offset - count) % self.slots
        if start + count <= self.slots:
            return ring[..., start : start + count, :]
        return mx.concatenate([ring[..., start:, :], ring[..., : start + count - self.slots, :]], axis=2)

    def _written(self, ring: mx.array, recent: mx.array) -> mx.array:
        """The ring once `recent` (rows in position order, ending at the current offset) is written."""
        recent = recent[..., -self.slots :, :]
        start = (self.offset - recent.shape[2]) % self.slots
        until_end = min(recent.shape[2], self.slots - start)
        ring[..., start : start + until_end, :] = recent[..., :until_end, :]
        if until_end < recent.shape[2]:
            ring[..., : recent.shape[2] - until_end, :] = recent[..., until_end:, :]
        return ring

    def keys_and_values(self):
        """The last window + 1 positions' keys and values in order (what the MTP assistant reads)."""
        held = min(self.offset, self.window + 1, self.slots)
        return self._in_order(self.keys, held), self._in_order(self.values, held)

    @property
    def state(self):
        return self.keys, self.values

    def is_trimmable(self) -> bool:
        return self.slots > self.window

    def trim(self, count: int) -> int:
        assert count <= self.slots - self.window - 1, "trimmed past the keys the window still needs"
        self.offset -= count
        return count

    def advance(self, count: int):
        """Undo trim(count) when nothing was written since: the positions it hid are still in the ring."""
        self.offset += count


class FullCache(KVCache):
    """A full-attention layer's keys and values in position order: mlx-lm's KVCache, plus room reserved ahead so
    that a run of one-token steps sees one buffer shape."""

    def advance(self, count: int):
        """Undo trim(count) when nothing was written since: the positions it hid are still in the buffer."""
        self.offset += count

    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, capacity: int):
        """Grow the buffer to hold `capacity` positions; what it holds is kept."""
        extra = capacity - self.capacity()
        if extra <= 0 or self.keys is None:
            return
        batch, heads, _, key_dim = self.keys.shape
        self.keys = mx.concatenate([self.keys, mx.zeros((batch, heads, extra, key_dim), self.keys.dtype)], axis=2)
        self.values = mx.concatenate(
            [self.values, mx.zeros((batch, heads, extra, self.values.shape[3]), self.values.dtype)], axis=2
        )
