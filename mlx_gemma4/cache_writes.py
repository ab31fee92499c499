"""A compiled step's writes into the caches' buffers in place, on CUDA: one launch a layer for its keys and values.

Why: MLX writes into an array in place (put_along_axis donating its input) only if nothing else holds the buffer when
the write is handed to the GPU, and it holds every queued command's inputs until the command has run. A step queued
while the step before still runs (the GPU behind the host, as with 8-bit caches deep in a context) finds the buffers
held by that step's attention and copies every buffer it writes: 0.51-0.66 GB above the live memory at 131,072
tokens with 8-bit KV, against 0.13-0.14 GB when each step waited for the one before
(bench/results/h200-long-context-memory-131k.json). Written in place, such steps held 0.31-0.32 GB, against 1.00-1.34
GB through put_along_axis in the same call (h200-long-context-memory-131k-kv8-writes-in-place.json,
-put-along-axis.json). The scatters are also two nodes a layer of a host-bound step.

How: the launch copies the step's rows into the buffers through a pointer cast from const, and hands out a copy of
the step's queries, which the attention then reads: MLX runs a command after the commands that made its inputs, so
the attention reads the rows written. The launch also takes, unread, an element of the last pass's output (the
caches' read_fence), made only after every read of the buffers in that pass: so it runs after them, and after that pass's
writes. Without it, steps queued together whose tokens were known in advance (none made from the step before) ran
out of order within one CUDA graph, and a step read a row before the step before had written it (a GPU test of
verify passes against one-token steps, tests/test_verify_exactness.py, failed). Each evaluation is its own CUDA
graph, and the graphs of a stream run in order, so a later prefill's writes come after the step's.

The buffers stay the same arrays, so whatever else holds them would see the write: the caches write in place only
into buffers they hold alone (kv_cache.QuantizingCache.buffers_shared; decode_step copies shared ones first).
"""

from functools import lru_cache

import mlx.core as mx

from .cuda_backend import cuda_backend, switched_on
from .cuda_source import CudaKernel

SWITCH = "MLX_GEMMA4_IN_PLACE_WRITES"  # "0" writes through put_along_axis, as on other backends (A/B runs)
THREADS = 256

# Copies the queries (any layout: MLX hands their shape and strides) to `then_out`, then each part's rows (1, heads,
# N, width; strided, the last axis contiguous) into its buffer (1, heads, capacity, width; strided likewise) at the
# rows `positions` names, 4 bytes a thread: every part's row is a multiple of 4 bytes (uses_in_place).
THEN_COPY = r"""
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < THEN_SIZE) {
    size_t rest = i, offset = 0;
    for (int axis = then_ndim - 1; axis >= 0; --axis) {
      offset += (rest % then_shape[axis]) * then_strides[axis];
      rest /= then_shape[axis];
    }
    then_out[i] = then[offset];
    return;
  }
  size_t j = i - THEN_SIZE;
"""

PART_COPY = r"""
  if (j < (size_t)HEADS * N * WORDS_{p}) {
    const size_t word = j % WORDS_{p}, row = j / WORDS_{p}, n = row % N, head = row / N;
    char* buffer = static_cast<char*>(const_cast<void*>(static_cast<const void*>(buffer_{p})));
    const char* rows = static_cast<const char*>(static_cast<const void*>(rows_{p}));
    const size_t element = sizeof(*buffer_{p});
    unsigned* to = reinterpret_cast<unsigned*>(
        buffer + (head * buffer_{p}_strides[1] + (size_t)positions[n] * buffer_{p}_strides[2]) * element) + word;
    const unsigned* from = reinterpret_cast<const unsigned*>(
        rows + (head * rows_{p}_strides[1] + n * rows_{p}_strides[2]) * element) + word;
    *to = *from;
    return;
  }
  j -= (size_t)HEADS * N * WORDS_{p};
"""


def in_place_possible() -> bool:
    """Whether a compiled step may write in place at all: the switch not off, MLX's CUDA backend."""
    return switched_on(SWITCH) and cuda_backend()


def uses_in_place(buffers: list, rows: list) -> bool:
    """The rule: in_place_possible, and each part's rows (1, heads, n, width) of its buffer's
    dtype, heads and width, a row a multiple of 4 bytes."""
    return in_place_possible() and all(
        buffer.ndim == 4 and part.ndim == 4 and buffer.dtype == part.dtype and buffer.shape[0] == part.shape[0] == 1
        and buffer.shape[1] == part.shape[1] and buffer.shape[3] == part.shape[3]
        and buffer.shape[3] * buffer.itemsize % 4 == 0
        for buffer, part in zip(buffers, rows))


@lru_cache(maxsize=None)
def write_kernel(parts: int):
    inputs = ["then", "positions", "after", *[f"buffer_{p}" for p in range(parts)],
              *[f"rows_{p}" for p in range(parts)]]
    source = THEN_COPY + "".join(PART_COPY.replace("{p}", str(p)) for p in range(parts))
    return CudaKernel(name=f"gemma4_cache_rows_in_place_{parts}", input_names=inputs, output_names=["then_out"],
                      source=source, ensure_row_contiguous=False)


def written_then(buffers: list, rows: list, positions: mx.array, then: mx.array, after: mx.array) -> mx.array:
    """Writes rows[p] (1, heads, n, width) into buffers[p] (1, heads, capacity, width) at the rows `positions` (n,)
    names, in place, in one launch that runs after `after` is made (it is not read); returns a copy of `then`, made
    by the same launch: whatever reads the buffers after the writes takes it as an input (uses_in_place must
    allow)."""
    heads, count = rows[0].shape[1], rows[0].shape[2]
    words = [part.shape[3] * part.itemsize // 4 for part in rows]
    total = then.size + heads * count * sum(words)
    return write_kernel(len(buffers))(
        inputs=[then, positions.astype(mx.int32), after, *buffers, *rows],
        template=[("THEN_SIZE", then.size), ("HEADS", heads), ("N", count),
                  *[(f"WORDS_{p}", w) for p, w in enumerate(words)]],
        grid=(-(-total // THREADS) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[then.shape], output_dtypes=[then.dtype])[0]
