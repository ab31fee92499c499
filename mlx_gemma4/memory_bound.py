"""Bounding what a long computation holds in flight: MLX's own memory limit, and pacing.

MLX evaluates a graph by handing its operations to the device without waiting for them, and every operation's
inputs stay allocated until the device has run it. On CUDA up to 10 command graphs of up to 1,000 MB each may be in
flight (MLX 0.32.4's limits on Hopper), so a 2,048-token prefill chunk of the 12B held ~11 GB beyond its weights and
cache on an H200, however the attention was blocked. MLX's evaluator waits for queued work to finish whenever the
active memory is over `mx.get_memory_limit()`; lowering the limit to what is live now plus a budget therefore bounds
the transient part on every backend, at the cost of the host waiting on the device a little more often. Measured
(bench/results/h200-prefill-memory-bound.json, 16K-token prompt): transient 11.4 GB unbounded, 2.1 GB with a 1 GiB
budget, prefill 3.36 s against 3.60 s. The limit alone cannot go much lower: MLX frees a command graph's inputs only
once the whole graph (up to 1,000 MB of them) has run, so a budget of 256 MiB still left 2.2 GB; pacing, below, is
what bounds it closer.

Pacing (`pace`) queues the prefill piece by piece (attention blocks, a layer's attention, its MLP) and waits for the
piece queued PACED_AHEAD before, which holds less and keeps the device busier. A piece's arrays include what it wrote to
its layer's cache: writes that nothing reads yet would otherwise stay queued, holding their inputs
(decoder.DecoderLayer.then_norm).

Waiting for a piece does not wait for MLX to release what its commands held: on CUDA a worker thread does that after
a host callback, which can fall behind the stream, so finished pieces' inputs piled up in some chunks (a 131K-token
prefill's transient reached 1.63 GB against 1.40 with the rule below: bench/results/
h200-prefill-memory-bound-131k-synchronize.json). Whenever the active memory is over the bound, `pace` therefore
waits for the whole stream with `mx.synchronize`, which waits for that release too.
"""

from collections import deque
from contextlib import contextmanager
from contextvars import ContextVar

import mlx.core as mx

# What a prefill chunk may hold beyond the memory live when it starts: room for a few of its largest intermediates
# (a 2,048-token chunk of the 12B makes 126 MB of gate/up activations per layer and 64 MB attention-score blocks),
# so that the device always has queued work. A piece in flight can overshoot the bound by ~0.45 GB, so 1 GiB let the
# 12B's transient reach 1.64 GB; 512 MiB held it to 0.93-1.16 GB from 8K to 262K tokens, at up to 10% more prefill time
# (H200, one run each: bench/results/h200-12b-4bit-long-context-synchronize-1gib.json against -512mib.json;
# h200-prefill-memory-bound-32k-budgets-synchronize.json: 0.96 against 1.25 GB at 32K, 7.03 against 6.75 s).
PREFILL_TRANSIENT_BYTES = 1 << 29
# Paced evaluations (`pace`) queued beyond the one being waited for: the device always has the next piece to run
# while the host waits. Measured on an H200 (12B, 2,048-token chunks, one prefill each), attention blocks of 2^26
# scores: transient 2.04 GB at 16K and 2.21 at 64K with one, 2.34 at 16K with two, 2.45 and 2.48 with none (MLX's
# memory limit alone); prefill 3.23 s against 3.72 s unpaced at 16K, 14.4 s against 17.0 s at 64K
# (bench/results/h200-prefill-pacing-16k.json, -64k.json). With blocks of 2^25 (attention.SCORES_PER_BLOCK) at 64K,
# two ahead against one: transient 1.30 against 1.46 GB, prefill 14.64 against 15.58 s
# (bench/results/h200-prefill-peaks-by-piece-64k.json). Single prefills: their spread is not known.
# 0 turns pacing off (studies).
PACED_AHEAD = 2

# The evaluations `pace` has queued, inside a transient_memory_bound block; None outside one.
_paced = ContextVar("paced", default=None)


@contextmanager
def transient_memory_bound(budget_bytes: int):
    """Within the block, `bound_to_live_memory(budget_bytes)` sets the limit and `pace` keeps its evaluations
    queued; on leaving, the limit in force before comes back, however the block ends."""
    previous = mx.get_memory_limit()
    paced = _paced.set(deque())
    try:
        yield lambda: bound_to_live_memory(budget_bytes, previous)
    finally:
        _paced.reset(paced)
        mx.set_memory_limit(previous)


def bound_to_live_memory(budget_bytes: int, ceiling: int):
    """The memory limit becomes the active memory now plus `budget_bytes` (never above `ceiling`, the caller's own
    limit). Called again as the live memory changes (a cache that grew), it moves the bound along."""
    mx.set_memory_limit(min(ceiling, mx.get_active_memory() + budget_bytes))


def pace(*arrays: mx.array):
    """Queues the evaluation of `arrays` (a layer's output, an attention block's running sums) and waits for the one
    queued PACED_AHEAD calls before, inside a transient_memory_bound block; elsewhere (a compiled step, whose arrays
    cannot be evaluated while it is traced) nothing.

    The memory limit alone leaves up to a whole command graph's inputs (1,000 MB on Hopper) in flight: MLX waits only
    for graphs it committed as full, and frees a graph's inputs once it has run. Waiting for an evaluation we queued
    frees everything before it, so what a prefill holds in flight is a few paced pieces, whatever MLX's graph size."""
    queued = _paced.get()
    if queued is None or PACED_AHEAD == 0:
        return
    mx.async_eval(*arrays)
    queued.append(arrays)
    if len(queued) > PACED_AHEAD:
        mx.eval(*queued.popleft())
    if over_bound():
        mx.synchronize()  # wait until what finished pieces held is released (module docstring)


def over_bound() -> bool:
    """Whether the active memory is over MLX's memory limit: inside a transient_memory_bound block, its bound."""
    return mx.get_active_memory() > mx.get_memory_limit()
