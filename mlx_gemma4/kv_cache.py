"""The target's key/value caches, laid out so that a one-token step has the same array shapes every time and can run
as one compiled function (decode_step.py), in plain generation and in the speculative loop alike.

A sliding layer keeps a ring of slots (the window, or a little more where drafts are rolled back), position p in
slot p % slots, so a step writes one slot and reads the whole ring; a full layer keeps its keys in position order in a buffer that only grows, so a step writes one
row and reads the buffer, masking the rows not yet written. Outside a compiled step both behave as mlx-lm's
RotatingKVCache and KVCache do: a prompt chunk gets its keys in position order, a sliding one with the window - 1
earlier keys before its own.

Either kind may hold its keys and values quantized (KVQuantization: mlx-lm's kv_bits, kv_group_size,
quantized_kv_start), as mx.quantize's (packed, scales, biases) triples; attention.py reads them as they are. Unlike
mlx-lm, whose rotating caches cannot be quantized, the sliding rings are quantized too.
"""

from dataclasses import dataclass
from typing import Optional, Union

import mlx.core as mx

from . import cache_writes
from .errors import Gemma4Error

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
Rows = Union[mx.array, tuple]  # (batch, heads, rows, head_dim), or a quantized (packed, scales, biases) triple


@dataclass(frozen=True)
class KVQuantization:
    """Keys and values stored at `bits` per number in groups of `group_size`, once a cache holds `start` positions
    (then everything it holds is quantized, as mlx-lm's quantized_kv_start does)."""

    bits: int = 8
    group_size: int = 64
    start: int = 0

    def __post_init__(self):
        if self.bits not in KV_BITS:
            raise Gemma4Error(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, not {self.bits}")
        if self.group_size not in KV_GROUP_SIZES:
            raise Gemma4Error(f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, "
                              f"not {self.group_size}")
        if self.start < 0:
            raise Gemma4Error("quantized_kv_start must be 0 or more")

    def quantize(self, rows: mx.array) -> tuple:
        if rows.shape[-1] % self.group_size:
            raise Gemma4Error(f"a head size of {rows.shape[-1]} cannot be quantized in groups of {self.group_size}")
        return tuple(mx.quantize(rows, group_size=self.group_size, bits=self.bits))


def held_arrays(cache) -> list:
    """The arrays a layer's cache holds; none for no cache, or for a compiled step's stand-in (decode_step.SlotCache),
    whose writes its step returns."""
    return cache.arrays() if isinstance(cache, QuantizingCache) else []


def kv_quantization(kv_bits: Optional[int], kv_group_size: int = 64, quantized_kv_start: int = 0):
    """mlx-lm's three options as one KVQuantization, or None when kv_bits is None."""
    return None if kv_bits is None else KVQuantization(kv_bits, kv_group_size, quantized_kv_start)


def as_rows(rows) -> Rows:
    return tuple(rows) if isinstance(rows, (list, tuple)) else rows


def is_quantized(rows: Rows) -> bool:
    return isinstance(rows, tuple)


def parts(rows: Rows) -> tuple:
    """A buffer's arrays: itself, or a quantized triple's three."""
    return rows if is_quantized(rows) else (rows,)


def row_count(rows: Rows) -> int:
    return (rows[0] if is_quantized(rows) else rows).shape[2]


def take_rows(rows: Rows, start: int, stop: int) -> Rows:
    if is_quantized(rows):
        return tuple(part[..., start:stop, :] for part in rows)
    return rows[..., start:stop, :]


def last_rows(rows: Rows, count: int) -> Rows:
    total = row_count(rows)
    return take_rows(rows, max(total - count, 0), total)


def concatenate_rows(pieces: list) -> Rows:
    if is_quantized(pieces[0]):
        return tuple(mx.concatenate(parts, axis=2) for parts in zip(*pieces))
    return mx.concatenate(pieces, axis=2)


def empty_rows(like: Rows, count: int) -> Rows:
    """`count` zero rows shaped as `like`'s (zeros dequantize to zero)."""
    if is_quantized(like):
        return tuple(empty_rows(part, count) for part in like)
    return mx.zeros((*like.shape[:2], count, like.shape[3]), like.dtype)


def with_rows_added(rows: Rows, count: int) -> Rows:
    """`rows` followed by `count` zero rows, made in one allocation (a concatenation with zeros makes the zeros
    first: at depth a full layer's whole buffer more, for a moment)."""
    if is_quantized(rows):
        return tuple(with_rows_added(part, count) for part in rows)
    return mx.pad(rows, [(0, 0), (0, 0), (0, count), (0, 0)])


def copied_rows(rows: Optional[Rows]) -> Optional[Rows]:
    """New buffers with `rows`' contents (MLX copies a buffer that another array holds when it adds zero to it)."""
    if rows is None:
        return None
    if is_quantized(rows):
        return tuple(copied_rows(part) for part in rows)
    return rows + mx.zeros((), rows.dtype)


def write_rows(buffer: Rows, start: int, rows: Rows):
    """Writes `rows` into `buffer` (in place) from row `start`."""
    if is_quantized(buffer):
        for part, new in zip(buffer, rows):
            part[..., start : start + new.shape[2], :] = new
    else:
        buffer[..., start : start + rows.shape[2], :] = rows


def quantization_of(triple: tuple, head_dim: int) -> tuple:
    """(bits, group size) of a quantized triple, read from its shapes: a packed row holds head_dim x bits / 32
    words, the scales one entry per group."""
    packed, scales, _ = triple
    return 32 * packed.shape[-1] // head_dim, head_dim // scales.shape[-1]


def quantize_like(buffer: Rows, rows: mx.array) -> Rows:
    """`rows` in `buffer`'s form: quantized as its triple is, or as they are."""
    if not is_quantized(buffer):
        return rows
    bits, group_size = quantization_of(buffer, rows.shape[-1])
    return tuple(mx.quantize(rows, group_size=group_size, bits=bits))


def read_fence_of(hidden: mx.array, copied: bool = False) -> mx.array:
    """One element of a pass's output (batch, tokens, hidden), (1, 1, 1): one shape and dtype whatever the pass, so
    that the compiled step taking it as an input is traced once. A view holds the whole output; `copied`, once
    evaluated, holds nothing of it (a prompt chunk's output is megabytes)."""
    fence = hidden[:1, -1:, :1]
    return copied_rows(fence) if copied else fence


class QuantizingCache:
    """What both caches share: when and how their keys and values are quantized."""

    def __init__(self, quantization: Optional[KVQuantization] = None):
        self.quantization = quantization
        self.keys = self.values = None
        self.offset = 0  # positions seen
        # Whether other arrays may share the buffers (a snapshot, a state handed out): a compiled step may write
        # them in place (cache_writes.py), so it first makes them the cache's own (hold_buffers_alone).
        self.buffers_shared = False
        # Made only after every read of the buffers so far: an element of the last pass's output (read_fence_of).
        # A write in place takes it as an input, so that it runs after those reads (cache_writes.py).
        self.read_fence = None

    def write_then_fetch(self, queries: mx.array, keys: mx.array, values: mx.array) -> tuple:
        """(queries, keys, values) to attend with, once this pass's keys and values are in the cache (the compiled
        step's stand-in, decode_step.SlotCache, may hand the queries back through an in-place write)."""
        if self.read_fence is not None and cache_writes.in_place_possible():
            # The pass before may have been a compiled step writing in place, which MLX does not see as a write:
            # these writes (and the reads of what they make) then come after it by this dependency alone.
            keys, values = mx.depends([keys, values], [self.read_fence])
        return (queries, *self.update_and_fetch(keys, values))

    def hold_buffers_alone(self):
        """Makes shared buffers the cache's own copies, so that writing them in place changes no other array."""
        if self.buffers_shared:
            self.keys, self.values = copied_rows(self.keys), copied_rows(self.values)
            self.buffers_shared = False

    @property
    def quantized(self) -> bool:
        return self.keys is not None and is_quantized(self.keys)

    def quantize_if_due(self):
        """Quantize what the cache holds once it holds quantization.start positions; later writes are quantized as
        they come."""
        if self.keys is None or self.quantized or self.quantization is None:
            return
        if self.offset >= self.quantization.start:
            self.keys, self.values = self.quantization.quantize(self.keys), self.quantization.quantize(self.values)
            self.buffers_shared = False  # new arrays

    def stored_form(self, keys: mx.array, values: mx.array) -> tuple:
        due = self.quantization is not None and self.offset >= self.quantization.start
        if self.quantized or (self.keys is None and due):
            return self.quantization.quantize(keys), self.quantization.quantize(values)
        return keys, values

    def quantization_fields(self) -> list:
        quantization = self.quantization
        return [None] * 3 if quantization is None else [quantization.bits, quantization.group_size, quantization.start]

    def restore(self, keys, values, offset: int, bits, group_size, start):
        """Sets what `state` described (lists where tuples were, as a saved file gives them back). The arrays came
        from elsewhere: the cache takes them as shared."""
        self.keys, self.values = as_rows(keys), as_rows(values)
        self.offset = offset
        self.quantization = None if bits is None else KVQuantization(bits, group_size, start)
        self.buffers_shared = True

    @classmethod
    def from_state(cls, state: list, buffers_shared: bool = True):
        """A cache of `state`'s arrays; buffers_shared=False where nothing else holds them (a file just loaded)."""
        cache = cls.__new__(cls)
        cache.state = state
        cache.buffers_shared = buffers_shared
        cache.read_fence = None  # nothing queued reads the arrays handed in
        return cache

    def arrays(self) -> list:
        """Every array the cache holds (a quantized triple's three parts each)."""
        return [part for rows in (self.keys, self.values) if rows is not None for part in parts(rows)]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.arrays())


class WindowCache(QuantizingCache):
    """A sliding-window layer's keys and values in a ring of `slots` slots (the window, or more when positions must
    be rolled back: the speculative loop trims rejected drafts by moving `offset` back, and the slots it frees
    still hold the window's oldest keys)."""

    def __init__(self, window: int, slots: Optional[int] = None, quantization: Optional[KVQuantization] = None):
        self.written = 0  # before QuantizingCache.__init__ sets the offset, which updates it
        super().__init__(quantization)
        self.window = window
        self.slots = slots or window

    @property
    def offset(self) -> int:
        return self._offset

    @offset.setter
    def offset(self, value: int):
        # Moving the offset back (a rollback, a prompt cache rewound) leaves what was written past it in the ring, so
        # how far the ring has wrapped is told by `written`, the furthest the offset has reached, not by the offset.
        self._offset = value
        self.written = max(self.written, value)

    def holds_window_before(self, position: int) -> bool:
        """Whether the ring still holds the window before `position` and the key before it, which the MTP assistant
        reads: none of them overwritten by a later position, as a ring moved back after it wrapped may have them."""
        return self.written <= self.slots or self.written - position <= self.slots - self.window - 1

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.quantize_if_due()
        keys, values = self.stored_form(keys, values)
        if self.keys is None:
            self.keys, self.values = empty_rows(keys, self.slots), empty_rows(values, self.slots)
        length = row_count(keys)
        if length == 1 and self.slots == self.window:
            # One query sees every key it could: softmax does not care about their order, so the ring is read as
            # it lies (only its written slots until it first fills).
            slot = self.offset % self.slots
            write_rows(self.keys, slot, keys)
            write_rows(self.values, slot, values)
            self.offset += 1
            visible = min(self.offset, self.slots)
            return take_rows(self.keys, 0, visible), take_rows(self.values, 0, visible)
        earlier = min(self.offset, self.window - 1)
        if earlier + length <= self.slots:
            # The ring holds the earlier keys and the new ones together: write, then read them back in order (a
            # view of the ring unless they wrap around its end).
            self.offset += length
            self._write(self.keys, keys)
            self._write(self.values, values)
            return self._in_order(self.keys, earlier + length), self._in_order(self.values, earlier + length)
        if earlier:
            keys = concatenate_rows([self._in_order(self.keys, earlier), keys])
            values = concatenate_rows([self._in_order(self.values, earlier), values])
        self.offset += length
        self._write(self.keys, keys)
        self._write(self.values, values)
        return keys, values

    def _in_order(self, ring: Rows, count: int) -> Rows:
        """The last `count` positions' rows, oldest first."""
        start = (self.offset - count) % self.slots
        if start + count <= self.slots:
            return take_rows(ring, start, start + count)
        return concatenate_rows([take_rows(ring, start, self.slots), take_rows(ring, 0, start + count - self.slots)])

    def _write(self, ring: Rows, recent: Rows):
        """Writes `recent` (rows in position order, ending at the current offset) into the ring."""
        count = min(row_count(recent), self.slots)
        recent = take_rows(recent, row_count(recent) - count, row_count(recent))
        start = (self.offset - count) % self.slots
        until_end = min(count, self.slots - start)
        write_rows(ring, start, take_rows(recent, 0, until_end))
        if until_end < count:
            write_rows(ring, 0, take_rows(recent, until_end, count))

    @property
    def state(self) -> list:
        """The ring, where it stands, and how it is quantized: what a saved prompt cache holds. Handed out, the ring
        is shared from now on (buffers_shared)."""
        self.buffers_shared = True
        return [self.keys, self.values, self.offset, self.window, self.slots, *self.quantization_fields()]

    @state.setter
    def state(self, state: list):
        keys, values, offset, self.window, self.slots, *quantization = state
        self.written = 0
        self.restore(keys, values, offset, *quantization)
        # A saved ring may hold positions written past its offset and rolled back, as many as a rollback may take.
        self.written = self.offset + self.slots - self.window - 1

    def keys_and_values(self):
        """The last window + 1 positions' keys and values in order (what the MTP assistant reads)."""
        held = min(self.offset, self.window + 1, self.slots)
        return self._in_order(self.keys, held), self._in_order(self.values, held)

    def is_trimmable(self) -> bool:
        return self.slots > self.window

    def trim(self, count: int) -> int:
        assert count <= self.slots - self.window - 1, "trimmed past the keys the window still needs"
        self.offset -= count
        return count

    def advance(self, count: int):
        """Undo trim(count) when nothing was written since: the positions it hid are still in the ring."""
        self.offset += count


class FullCache(QuantizingCache):
    """A full-attention layer's keys and values in position order, in a buffer that grows in steps of `step` rows
    (as mlx-lm's KVCache), or to a capacity reserved ahead: a run of one-token steps then sees one buffer shape, and
    a long prompt reserved in full is never copied to grow."""

    step = 256

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.quantize_if_due()
        keys, values = self.stored_form(keys, values)
        end = self.offset + row_count(keys)
        if self.keys is None:
            self.keys, self.values = empty_rows(keys, 0), empty_rows(values, 0)
        if self.capacity() < end:
            self.reserve(-(-end // self.step) * self.step)
        write_rows(self.keys, self.offset, keys)
        write_rows(self.values, self.offset, values)
        self.offset = end
        return self.keys_and_values()

    def keys_and_values(self):
        return take_rows(self.keys, 0, self.offset), take_rows(self.values, 0, self.offset)

    @property
    def state(self) -> list:
        """The rows written and how they are quantized: what a saved prompt cache holds. Handed out (views of the
        buffers), the buffers are shared from now on (buffers_shared)."""
        self.buffers_shared = True
        written = self.keys_and_values() if self.keys is not None else (None, None)
        return [*written, self.offset, *self.quantization_fields()]

    @state.setter
    def state(self, state: list):
        self.restore(*state)

    def advance(self, count: int):
        """Undo trim(count) when nothing was written since: the positions it hid are still in the buffer."""
        self.offset += count

    def capacity(self) -> int:
        return 0 if self.keys is None else row_count(self.keys)

    def reserve(self, capacity: int):
        """Grow the buffer to hold `capacity` positions; what it holds is kept. (Before the first write the shapes
        are unknown: nothing to do.)"""
        extra = capacity - self.capacity()
        if extra <= 0 or self.keys is None:
            return
        self.keys = with_rows_added(self.keys, extra)
        self.values = with_rows_added(self.values, extra)
        self.buffers_shared = False  # new arrays

    def is_trimmable(self) -> bool:
        return True

    def trim(self, count: int) -> int:
        count = min(self.offset, count)
        self.offset -= count
        return count
