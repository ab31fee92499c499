"""Caches of earlier conversations, so that a request prefills only what it does not share with one of them.

An entry is a list of layer caches and the prompt keys it holds (token ids; a media item's placeholders carry the
item's digest, so the same tokens over another picture never match). A request takes the entry that covers the longest
prefix of its prompt. A cache whose keys run past that prefix is moved back to it when every layer still holds what
the next position needs: a full-attention layer always does; a sliding-window ring only when the positions dropped
and the window before them are still in its slots. Where a ring cannot go back, the copy kept at the end of the
previous prompt serves: `snapshot` shares the arrays (mlx arrays are values: the next write to the live cache copies
the buffer it writes, once, as MLX does for a write into a shared array and the compiled step does for its in-place
writes, kv_cache's buffers_shared), so it costs nothing until then.

The store is bounded by entries and by bytes, least recently used first out."""

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from ..kv_cache import WindowCache

DEFAULT_MAX_ENTRIES = 10
DEFAULT_MAX_BYTES = 8 * 1024**3


def cache_bytes(cache: list) -> int:
    return sum(layer.nbytes for layer in cache)


def shared_rows(rows):
    """A new array (or quantized triple of arrays) over the same buffers: writing to the live cache replaces its own
    arrays only."""
    if rows is None:
        return None
    return tuple(part[...] for part in rows) if isinstance(rows, tuple) else rows[...]


def snapshot(cache: list) -> list:
    """Layer caches equal to `cache` now, unchanged by whatever is written to `cache` later."""
    copies = []
    for layer in cache:
        duplicate = copy.copy(layer)
        duplicate.keys, duplicate.values = shared_rows(layer.keys), shared_rows(layer.values)
        # Neither may now be written in place (cache_writes.py): the next step copies its buffers first.
        layer.buffers_shared = duplicate.buffers_shared = True
        copies.append(duplicate)
    return copies


def can_rewind(cache: list, length: int) -> bool:
    """Whether every layer can be moved back to hold exactly the first `length` positions. A ring must still hold the
    window before `length` and the one key past it the MTP drafter reads (WindowCache.holds_window_before: a ring
    moved back after it wrapped holds fewer than its offset says)."""
    return all(not isinstance(layer, WindowCache) or length >= layer.offset or layer.holds_window_before(length)
               for layer in cache)


def rewind(cache: list, length: int):
    for layer in cache:
        layer.offset = min(layer.offset, length)


def common_prefix(left: list, right: list) -> int:
    length = min(len(left), len(right))
    for index in range(length):
        if left[index] != right[index]:
            return index
    return length


@dataclass
class Entry:
    keys: list
    cache: list
    nbytes: int


class PromptCacheStore:
    def __init__(self, make_cache: Callable[[], list], max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.make_cache = make_cache
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: "OrderedDict[int, Entry]" = OrderedDict()
        self.next_id = 0

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    def take(self, keys: list) -> tuple:
        """(cache, reused length): a copy of the entry covering the longest prefix of `keys` that leaves at least one
        key to feed (the model needs one to give the next token's logits), moved back to that prefix; or a fresh
        cache and 0. The entry stays, so that a retried or branched request finds it again."""
        best: Optional[tuple] = None
        for entry_id, entry in self.entries.items():
            length = min(common_prefix(entry.keys, keys), len(keys) - 1)
            if length <= 0 or (length < len(entry.keys) and not can_rewind(entry.cache, length)):
                continue
            if best is None or length > best[1]:
                best = (entry_id, length)
        if best is None:
            return self.make_cache(), 0
        self.entries.move_to_end(best[0])
        cache = snapshot(self.entries[best[0]].cache)
        rewind(cache, best[1])
        return cache, best[1]

    def put(self, keys: list, cache: list):
        if not keys or cache[0].offset != len(keys):
            return  # a cache whose length does not match its keys could only mislead a later request
        for entry_id, entry in list(self.entries.items()):
            if entry.keys == keys:
                del self.entries[entry_id]
        self.entries[self.next_id] = Entry(list(keys), cache, cache_bytes(cache))
        self.next_id += 1
        while self.entries and (len(self.entries) > self.max_entries or self.nbytes > self.max_bytes):
            self.entries.popitem(last=False)

    def clear(self):
        self.entries.clear()
