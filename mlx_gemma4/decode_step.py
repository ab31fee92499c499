"""One-token decoding steps as one compiled function.

A plain step builds its graph in Python, ~25 operations for each of 48 layers, every token; on a fast GPU that takes
as long as the GPU's own work, so decoding waits on the host. Compiled, the graph is traced once and replayed, and
mx.compile fuses the step's elementwise tails into fewer kernels. A compiled function needs the same array shapes at
every call, which the caches of kv_cache.py give: the step writes its keys and values at the position it is handed
(an array, so every position is one trace) and reads the whole buffers, masking what it must not see. Full layers'
buffers grow in steps of CAPACITY_STEP positions, each a new trace, kept in the model's `compiled_steps` for later
generations. A trace holds the weights it was made with as constants, so the traces are dropped whenever a parameter
of the model has been replaced since (model.update, load_weights, quantizing, an adapter).
"""

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import FULL, SLIDING
from .kv_cache import FullCache, WindowCache, is_quantized, quantize_like, row_count

# Rows a full layer's buffer grows by: each growth costs one trace; the masked rows cost a step a little reading.
CAPACITY_STEP = 1024


class SlotCache:
    """Stands in for a layer's cache inside the traced step: writes the new keys and values at `slot`, quantized
    when the buffers are."""

    def __init__(self, keys, values, slot: mx.array, position: mx.array):
        self.keys, self.values, self.slot, self.offset = keys, values, slot, position

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys = self._written(self.keys, keys)
        self.values = self._written(self.values, values)
        return self.keys, self.values

    def _written(self, buffer, rows: mx.array):
        rows = quantize_like(buffer, rows)
        if is_quantized(buffer):
            return tuple(written_at(part, new, self.slot) for part, new in zip(buffer, rows))
        return written_at(buffer, rows, self.slot)


def written_at(buffer: mx.array, rows: mx.array, slot: mx.array) -> mx.array:
    """`buffer` (batch, heads, positions, width) with `rows` (batch, heads, 1, width) written at position `slot`, in
    place where the buffer can be donated. A scatter, not mx.slice_update at an array offset: MLX 0.32.4's CUDA
    kernel for the latter runs one thread per element of the whole buffer, not of the rows written (80 writes
    took 2.3 ms of a 12B step at 512 positions, 16 more 2.4 ms at 32K on an H200:
    bench/results/h200-decode-kernel-profile-before.json)."""
    index = mx.broadcast_to(slot.reshape(1, 1, 1, 1), rows.shape)
    return mx.put_along_axis(buffer, index, rows, axis=2)


def supports(cache: list) -> bool:
    return bool(cache) and all(isinstance(c, (WindowCache, FullCache)) for c in cache)


def sliding_mask(position: mx.array, slots: int, window: int) -> mx.array:
    """Which ring slots the query at `position` sees: those written (at or before it) and within the window. Slot j
    holds the latest position congruent to j, `age` steps back."""
    age = (position - mx.arange(slots) + slots) % slots
    return (age < window) & (age <= position)


def traced_step(model, sliding_masked: bool):
    """step(token (1, 1), position (1,), ring slot (1,), [(keys, values) per cache]) -> (logits, final-normed hidden,
    new buffers). A ring of exactly the window, once full, holds only keys the query sees, so it needs no mask: a
    different graph, hence one function for each case."""
    text = model.language_model.model
    window = text.config.sliding_window
    sliding = [text.config.layer_types[i] == SLIDING for i in text.cached_layers]

    def step(token, position, ring_slot, buffers):
        caches = [SlotCache(keys, values, ring_slot if is_sliding else position, position)
                  for (keys, values), is_sliding in zip(buffers, sliding)]
        rows = {is_sliding: row_count(keys) for (keys, _), is_sliding in zip(buffers, sliding)}
        masks = {FULL: mx.arange(rows[False]) <= position if False in rows else None,
                 SLIDING: sliding_mask(position, rows[True], window) if sliding_masked and True in rows else None}
        hidden = text(model.embed_inputs(token), cache=caches, masks=masks)
        return model.language_model.logits(hidden), hidden, [(c.keys, c.values) for c in caches]

    return mx.compile(step)


class CompiledSteps:
    """A model's compiled step functions ({sliding layers masked: function}), the buffer shapes already traced, and
    the parameter arrays they were traced with. Model owns one, so that every later generation replays its traces."""

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
    """A function token (1, 1) -> logits (1, 1, vocab) (with `return_hidden`, (logits, final-normed hidden)) that
    advances `cache` by one position: compiled when the caches are kv_cache's (model.make_cache(), or the speculative
    loop's), the plain forward pass otherwise.

    Made once the prompt is queued, it makes room in the buffers and traces what the steps will replay right away:
    a trace costs about as much host time as ten steps, which the device's work on the prompt then hides."""
    if not supports(cache):
        return lambda token: model(token, cache=cache, return_hidden=return_hidden)
    window = model.language_model.model.config.sliding_window
    full_caches = [c for c in cache if isinstance(c, FullCache)]
    slots = next((c.slots for c in cache if isinstance(c, WindowCache)), window)
    compiled = model.compiled_steps
    compiled.drop_if_stale(model)

    def masked(position: int) -> bool:
        return slots > window or position < window - 1

    def run(sliding_masked: bool, token: mx.array, position: int):
        if sliding_masked not in compiled.functions:
            compiled.functions[sliding_masked] = traced_step(model, sliding_masked)
        compiled.traced.add(trace_key(sliding_masked))
        return compiled.functions[sliding_masked](
            token, mx.array([position]), mx.array([position % slots]), [(c.keys, c.values) for c in cache]
        )

    def trace_key(sliding_masked: bool) -> tuple:
        return sliding_masked, slots, full_caches[0].capacity() if full_caches else 0, cache[0].quantized

    def make_room(position: int):
        for full_cache in full_caches:
            if full_cache.capacity() <= position:
                full_cache.reserve((position // CAPACITY_STEP + 1) * CAPACITY_STEP)

    def trace_ahead(position: int):
        make_room(position)
        for sliding_masked in {masked(position), masked(max(position, window - 1))}:
            if trace_key(sliding_masked) not in compiled.traced:
                run(sliding_masked, mx.zeros((1, 1), dtype=mx.int32), position)  # traced, never evaluated

    def step(token: mx.array):
        position = cache[0].offset
        if position == 0:  # the buffers are made by the first write
            return model(token, cache=cache, return_hidden=return_hidden)
        for layer_cache in cache:
            layer_cache.quantize_if_due()
        make_room(position)
        logits, hidden, buffers = run(masked(position), token, position)
        # The old buffers are now referenced only by the step's graph, which can then write into them in place.
        for layer_cache, (keys, values) in zip(cache, buffers):
            layer_cache.keys, layer_cache.values = keys, values
            layer_cache.offset += 1
        return (logits, hidden) if return_hidden else logits

    if cache[0].offset:
        trace_ahead(cache[0].offset)
    return step
