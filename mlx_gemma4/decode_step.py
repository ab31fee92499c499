"""Decoding steps (one token, or a speculative verify pass of a few) as one compiled function.

A plain step builds its graph in Python, ~25 operations for each of 48 layers, every token; on a fast GPU that takes
as long as the GPU's own work, so decoding waits on the host. Compiled, the graph is traced once and replayed, and
mx.compile fuses the step's elementwise tails into fewer kernels. A compiled function needs the same array shapes at
every call, which the caches of kv_cache.py give: the step writes its keys and values at the position it is handed
(an array, so every position is one trace) and reads the whole buffers, masking what it must not see. Full layers'
buffers grow in steps of CAPACITY_STEP positions, each a new trace, kept in the model's `compiled_steps` for later
generations. A trace holds the weights it was made with as constants, so the traces are dropped whenever a parameter
of the model has been replaced since (model.update, load_weights, quantizing, an adapter).

A step of several tokens (the speculative loop's verify pass) writes them at consecutive positions and masks, for
each, the keys after it; a sliding layer's ring must then have room for the window and the pass's other tokens, as
every ring model.make_cache() makes has (decoder.RING_SPARE_SLOTS); on a ring of exactly the window such a step
runs the plain forward pass.
"""

import mlx.core as mx
from mlx.utils import tree_flatten

from . import cache_writes
from .config import FULL, SLIDING
from .kv_cache import FullCache, WindowCache, is_quantized, parts, quantize_like, read_fence_of, row_count

# Rows a full layer's buffer grows by: each growth costs one trace; the masked rows cost a step a little reading.
CAPACITY_STEP = 1024


class SlotCache:
    """Stands in for a layer's cache inside the traced step: writes the new keys and values at `slot` (one position
    a row), quantized when the buffers are."""

    def __init__(self, keys, values, slot: mx.array, position: mx.array, indices: "SlotIndices", read_fence: mx.array):
        self.keys, self.values, self.slot, self.offset = keys, values, slot, position
        self.indices, self.read_fence = indices, read_fence

    def write_then_fetch(self, queries: mx.array, keys: mx.array, values: mx.array) -> tuple:
        """(queries, keys, values) to attend with: the step's rows written at `slot`, in place where
        cache_writes.uses_in_place allows (the buffers stay these arrays; the queries come back through the write,
        so that the attention reads what it wrote), through put_along_axis otherwise."""
        keys, values = quantize_like(self.keys, keys), quantize_like(self.values, values)
        buffers, rows = [*parts(self.keys), *parts(self.values)], [*parts(keys), *parts(values)]
        if not cache_writes.uses_in_place(buffers, rows):
            return (queries, *self._written(keys, values))
        written = cache_writes.written_then(buffers, rows, self.slot, queries, after=self.read_fence)
        return written, self.keys, self.values

    def _written(self, keys, values) -> tuple:
        """The buffers with `keys` and `values` (in the buffers' form) written at `slot`, as new arrays."""
        self.keys, self.values = self._scattered(self.keys, keys), self._scattered(self.values, values)
        return self.keys, self.values

    def _scattered(self, buffer, rows):
        if is_quantized(buffer):
            return tuple(written_at(part, new, self.indices(self.slot, new.shape)) for part, new in zip(buffer, rows))
        return written_at(buffer, rows, self.indices(self.slot, rows.shape))


class SlotIndices:
    """The scatter indices of a step's writes, made once for each slot array and shape written: the layers of a kind
    write alike, and an index made for each write would be two more nodes of the host-bound step's graph (192 a 12B
    step: 96 writes)."""

    def __init__(self):
        self.made = {}

    def __call__(self, slot: mx.array, shape: tuple) -> mx.array:
        key = id(slot), tuple(shape)  # the slot arrays live as long as the step's trace, so ids stay theirs
        if key not in self.made:
            self.made[key] = mx.broadcast_to(slot.reshape(1, 1, -1, 1), shape)
        return self.made[key]


def written_at(buffer: mx.array, rows: mx.array, index: mx.array) -> mx.array:
    """`buffer` (batch, heads, positions, width) with `rows` (batch, heads, n, width) written at the positions
    `index` (rows' shape, SlotIndices') names, in place where the buffer can be donated. A scatter, not
    mx.slice_update at an array offset: MLX 0.32.4's CUDA kernel for the latter runs one thread per element of the
    whole buffer, not of the rows written (80 writes took 2.3 ms of a 12B step at 512 positions, 16 more 2.4 ms at
    32K on an H200: bench/results/h200-decode-kernel-profile-before.json)."""
    return mx.put_along_axis(buffer, index, rows, axis=2)


def supports(cache: list) -> bool:
    return bool(cache) and all(isinstance(c, (WindowCache, FullCache)) for c in cache)


def sliding_mask(positions: mx.array, slots: int, window: int) -> mx.array:
    """(queries, slots): which ring slots each query (at `positions`, consecutive) sees once the step has written
    all of them. Slot j then holds the latest position congruent to j up to the last query's (`held`; negative: never
    written); a query sees it when that position is its own or earlier and within its window. A slot the step
    overwrote held a position over `slots` back, which none of its queries could see."""
    last = positions[-1]
    held = last - (last - mx.arange(slots) + slots) % slots
    queries = positions[:, None]
    return (held <= queries) & (queries - held < window) & (held >= 0)


def full_mask(positions: mx.array, capacity: int) -> mx.array:
    """(queries, capacity): each query (at `positions`) sees the buffer's positions up to its own."""
    return mx.arange(capacity) <= positions[:, None]


def traced_step(model, sliding_masked: bool, tokens: int):
    """step(tokens (1, tokens), position (1,), ring slots (tokens,), [(keys, values) per cache], the caches'
    read_fence) -> (logits, final-normed hidden, new buffers). A ring of exactly the window, once full, holds only
    keys a lone query sees, so it needs no mask: a different graph, hence one function for each case and number of
    tokens."""
    text = model.language_model.model
    window = text.config.sliding_window
    sliding = [text.config.layer_types[i] == SLIDING for i in text.cached_layers]

    def step(token_ids, position, ring_slots, buffers, read_fence):
        positions = position + mx.arange(tokens)
        indices = SlotIndices()
        caches = [SlotCache(keys, values, ring_slots if is_sliding else positions, position, indices, read_fence)
                  for (keys, values), is_sliding in zip(buffers, sliding)]
        rows = {is_sliding: row_count(keys) for (keys, _), is_sliding in zip(buffers, sliding)}
        masks = {FULL: full_mask(positions, rows[False]) if False in rows else None,
                 SLIDING: sliding_mask(positions, rows[True], window) if sliding_masked and True in rows else None}
        hidden = text(model.embed_inputs(token_ids), cache=caches, masks=masks)
        return model.language_model.logits(hidden), hidden, [(c.keys, c.values) for c in caches]

    return mx.compile(step)


class CompiledSteps:
    """A model's compiled step functions ({(sliding layers masked, tokens): function}), the buffer shapes already
    traced, and the parameter arrays they were traced with. Model owns one, so that every later generation replays
    its traces."""

    def __init__(self):
        self.functions = {}
        self.traced = set()
        self.weights = []

    def drop_if_stale(self, model):
        """Forget every trace if any parameter of `model` is another array than at tracing time. Replacing arrays
        is how MLX changes weights (Module.update, load_weights, quantize, optimizers); the traced arrays are held
        here, so none can be freed and an identity be reused while the traces exist."""
        weights = [value for _, value in tree_flatten(model.parameters())]
        if len(weights) != len(self.weights) or any(now is not then for now, then in zip(weights, self.weights)):
            self.forget()
            self.weights = weights

    def forget(self):
        """Drop every trace, so that the next steps trace anew (as after a kernel switch: a trace keeps the path it
        was made with)."""
        self.functions.clear()
        self.traced.clear()


def decode_step(model, cache: list, return_hidden: bool = False):
    """A function tokens (1, n) -> logits (1, n, vocab) (with `return_hidden`, (logits, final-normed hidden)) that
    advances `cache` by n positions: compiled when the caches are kv_cache's (model.make_cache(), or the speculative
    loop's) and their rings have room for n - 1 tokens beyond the window, the plain forward pass otherwise.

    The function's optional second argument, `rollback` ((1,) int32, computed on the device), is how many of the
    positions the caches' offsets count were rejected by a speculative round not yet read on the host: the step then
    writes at offset - rollback, and the offsets stay upper bounds until the loop trims them. The position then only
    selects the trace (the buffers' capacity), and the masks come from the array, so rolled-back rings need spare
    slots (as make_cache's have) and a quantization must not be due.

    Made once the prompt is queued, it makes room in the buffers and traces what the steps will replay right away:
    a trace costs about as much host time as ten steps, which the device's work on the prompt then hides."""
    if not supports(cache):
        return lambda token: model(token, cache=cache, return_hidden=return_hidden)
    window = model.language_model.model.config.sliding_window
    full_caches = [c for c in cache if isinstance(c, FullCache)]
    slots = next((c.slots for c in cache if isinstance(c, WindowCache)), window)
    compiled = model.compiled_steps
    fence_dtype = model.language_model.model.norm.weight.dtype  # the passes' output's, hence their fences'
    compiled.drop_if_stale(model)

    def masked(position: int, tokens: int) -> bool:
        return tokens > 1 or slots > window or position < window - 1

    def run(sliding_masked: bool, token_ids: mx.array, position: int, rollback=None):
        tokens = token_ids.shape[1]
        if (sliding_masked, tokens) not in compiled.functions:
            compiled.functions[sliding_masked, tokens] = traced_step(model, sliding_masked, tokens)
        compiled.traced.add(trace_key(sliding_masked, tokens))
        if rollback is None:
            at, ring_slots = mx.array([position]), mx.array([(position + i) % slots for i in range(tokens)])
        else:
            at = position - rollback
            ring_slots = (at + mx.arange(tokens)) % slots
        # A cache with no pass behind it (its arrays loaded or handed in) has no queued reads to wait for.
        fence = cache[0].read_fence if cache[0].read_fence is not None else mx.zeros((1, 1, 1), fence_dtype)
        return compiled.functions[sliding_masked, tokens](
            token_ids, at, ring_slots, [(c.keys, c.values) for c in cache], fence
        )

    def trace_key(sliding_masked: bool, tokens: int) -> tuple:
        return sliding_masked, tokens, slots, full_caches[0].capacity() if full_caches else 0, cache[0].quantized

    def make_room(last_position: int):
        for full_cache in full_caches:
            if full_cache.capacity() <= last_position:
                full_cache.reserve((last_position // CAPACITY_STEP + 1) * CAPACITY_STEP)

    def trace_ahead(position: int):
        make_room(position)
        for sliding_masked in {masked(position, 1), masked(max(position, window - 1), 1)}:
            if trace_key(sliding_masked, 1) not in compiled.traced:
                run(sliding_masked, mx.zeros((1, 1), dtype=mx.int32), position)  # traced, never evaluated

    def step(token_ids: mx.array, rollback=None):
        position, tokens = cache[0].offset, token_ids.shape[1]
        # The buffers are made by the first write; a ring must keep the window while the pass writes its tokens.
        if position == 0 or slots < window + tokens - 1:
            assert rollback is None, "only a compiled step takes its position from the device"
            return model(token_ids, cache=cache, return_hidden=return_hidden)
        for layer_cache in cache:
            layer_cache.quantize_if_due()
        make_room(position + tokens - 1)
        for layer_cache in cache:
            layer_cache.hold_buffers_alone()  # the step may write them in place (cache_writes.py)
        logits, hidden, buffers = run(masked(position, tokens), token_ids, position, rollback)
        # The old buffers are now referenced only by the step's graph, which can then write into them in place.
        fence = read_fence_of(hidden)
        for layer_cache, (keys, values) in zip(cache, buffers):
            layer_cache.keys, layer_cache.values = keys, values
            layer_cache.offset += tokens
            layer_cache.read_fence = fence
        return (logits, hidden) if return_hidden else logits

    if cache[0].offset:
        trace_ahead(cache[0].offset)
    return step
