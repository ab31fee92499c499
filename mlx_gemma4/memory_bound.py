"""Bounding what a long computation holds in flight, through MLX's own memory limit.

MLX evaluates a graph by handing its operations to the device without waiting for them, and every operation's
inputs stay allocated until the device has run it. On CUDA up to 10 command graphs of up to 1,000 MB each may be in
flight (MLX 0.32.4's limits on Hopper), so a 2,048-token prefill chunk of the 12B held ~11 GB beyond its weights and
cache on an H200, however the attention was blocked. MLX's evaluator waits for queued work to finish whenever the
active memory is over `mx.get_memory_limit()`; lowering the limit to what is live now plus a budget therefore bounds
the transient part on every backend, at the cost of the host waiting on the device a little more often. Measured
(bench/results/h200-prefill-memory-bound.json, 16K-token prompt): transient 11.4 GB unbounded, 2.1 GB with this
budget, prefill 3.36 s against 3.60 s. The bound cannot go much lower: MLX frees a command graph's inputs only once
the whole graph (up to 1,000 MB of them) has run, so a budget of 256 MiB still left 2.2 GB.
"""

from contextlib import contextmanager

import mlx.core as mx

# What a prefill chunk may hold beyond the memory live when it starts: room for a few of its largest intermediates
# (a 2,048-token chunk of the 12B makes 126 MB of gate/up activations per layer and 128 MB attention-score blocks),
# so that the device always has queued work.
PREFILL_TRANSIENT_BYTES = 1 << 30


@contextmanager
def transient_memory_bound(budget_bytes: int):
    """Within the block, `bound_to_live_memory(budget_bytes)` sets the limit; on leaving, the limit in force before
    comes back, however the block ends."""
    previous = mx.get_memory_limit()
    try:
        yield lambda: bound_to_live_memory(budget_bytes, previous)
    finally:
        mx.set_memory_limit(previous)


def bound_to_live_memory(budget_bytes: int, ceiling: int):
    """The memory limit becomes the active memory now plus `budget_bytes` (never above `ceiling`, the caller's own
    limit). Called again as the live memory changes (a cache that grew), it moves the bound along."""
    mx.set_memory_limit(min(ceiling, mx.get_active_memory() + budget_bytes))
