"""Variants of the few-row kernel, built beside the package's (same template ints, other source): 29b7511's source
("old", read from a copy of that commit's package named by OLD_PACKAGE: `git archive 29b7511 mlx_gemma4 | tar -x -C
/tmp/pkg-29b7511`), this tree's ("lean"), 29b7511's with x loaded a chunk ahead ("xpf"), and a plain
stream over W's words (the floor)."""
import os
import math
from functools import lru_cache
import mlx.core as mx
from mlx_gemma4 import quantized_matvec as qm
from mlx_gemma4.cuda_source import compact
from mlx_gemma4.quantized_matvec_source import HEADER

OLD_PACKAGE = os.environ.get("OLD_PACKAGE", "/tmp/pkg-29b7511")
# The kernel's source sits in quantized_matvec_source.py since f7441d5, in quantized_matvec.py before.
OLD_SOURCE_FILE = next(path for name in ("quantized_matvec_source.py", "quantized_matvec.py")
                       for path in [os.path.join(OLD_PACKAGE, "mlx_gemma4", name)] if os.path.exists(path))


def _replace(text, old, new):
    assert text.count(old) == 1, old[:60]
    return text.replace(old, new)


# x for chunk i + 1 is loaded while chunk i is multiplied: 29b7511's kernel loads x inside the chunk's loop, so
# every chunk waits for an L1/L2 round trip before its first product.
OLD = open(OLD_SOURCE_FILE).read().split('SOURCE = r"""')[1].split('"""')[0]
X_AHEAD_PATCHES = [("""  #pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) fetch(i);
""", """  uint4 x_next4[LOAD_WORDS][NT];
  uint2 x_next2[LOAD_WORDS][NT];
  auto load_x = [&](int i) {
    const int c = warp + i * KSPLIT;
    #pragma unroll
    for (int j = 0; j < LOAD_WORDS; ++j)
      #pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int m = n * 8 + g;
        const int k = c * CHUNK + t * CODES_PER_LANE + j * CODES_PER_WORD;
        const bool live = m < M && i < my_chunks;
        if constexpr (BITS == 4)
          x_next4[j][n] = live ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + k)) : make_uint4(0, 0, 0, 0);
        else
          x_next2[j][n] = live ? __ldg(reinterpret_cast<const uint2*>(x + (size_t)m * K + k)) : make_uint2(0, 0);
      }
  };
  load_x(0);
  #pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) fetch(i);
"""),
                   ("""    fetch(i + STAGES - 1);
    wait_copies<STAGES - 1>();
""", """    fetch(i + STAGES - 1);
    uint4 x_now4[LOAD_WORDS][NT];
    uint2 x_now2[LOAD_WORDS][NT];
    #pragma unroll
    for (int j = 0; j < LOAD_WORDS; ++j)
      #pragma unroll
      for (int n = 0; n < NT; ++n) {
        x_now4[j][n] = x_next4[j][n];
        x_now2[j][n] = x_next2[j][n];
      }
    load_x(i + 1);
    wait_copies<STAGES - 1>();
"""),
                   ("""        for (int n = 0; n < NT; ++n) {
          const int m = n * 8 + g;
          xs[n] = m < M ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + k)) : make_uint4(0, 0, 0, 0);
        }
""", """        for (int n = 0; n < NT; ++n) xs[n] = x_now4[j][n];
"""),
                   ("""          const int m = n * 8 + g;
          const uint2 xv = m < M ? __ldg(reinterpret_cast<const uint2*>(x + (size_t)m * K + k)) : make_uint2(0, 0);
""", """          const uint2 xv = x_now2[j][n];
"""),
                   ("      const int k = c * CHUNK + t * CODES_PER_LANE + j * CODES_PER_WORD;"
                    "  // this lane's codes of word j\n", "")]


def x_prefetched(source: str) -> str:
    """`source` (29b7511's or 709daf0's) with x loaded a chunk ahead, as this tree's source now does."""
    for old, new in X_AHEAD_PATCHES:
        source = _replace(source, old, new)
    return source


# Made on first use: the patches apply only to sources from before x was loaded ahead.
SOURCES = {"xpf": lambda: x_prefetched(OLD), "old": lambda: OLD, "lean": lambda: qm.SOURCE}


@lru_cache(maxsize=None)
def kernel(variant: str, shared_bytes: int):
    return mx.fast.cuda_kernel(name=f"gemma4_few_rows_{variant}", input_names=["x", "w", "scales", "biases"],
                               output_names=["out"], source=compact(SOURCES[variant]()),
                               header=compact(HEADER), shared_memory=shared_bytes)


def matmul(variant, x, w, scales, biases, group_size, bits, gated=False, tiles_split_stages=None):
    """The product through `variant`'s source, by the package's launch plan or by (RT, KSPLIT, STAGES)."""
    rows_of_x = math.prod(x.shape[:-1])
    if tiles_split_stages is None:
        plan = qm.launch_plan(w.shape[0], x.shape[-1], bits, group_size, rows_of_x)
    else:
        plan = qm.sized_plan(w.shape[0], bits, group_size, rows_of_x, *tiles_split_stages)
    return qm.launch(kernel(variant, plan["shared_bytes"]), plan, x, w, scales, biases, group_size, bits, gated)


# The floor in this harness: one pass over W's words with 16-byte loads, four in flight per thread, nothing else.
STREAM = r"""
  const uint4* p = reinterpret_cast<const uint4*>(w);
  const size_t n = (size_t)WORDS / 4, stride = (size_t)gridDim.x * blockDim.x;
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  uint32_t acc = 0;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride);
    const uint4 c = __ldcs(p + i + 2 * stride), d = __ldcs(p + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < n; i += stride) { const uint4 a = __ldcs(p + i); acc ^= a.x ^ a.y ^ a.z ^ a.w; }
  if (acc == 0x9E3779B9u) out[0] = __float2bfloat16(1.0f);
"""


@lru_cache(maxsize=None)
def stream_kernel():
    return mx.fast.cuda_kernel(name="stream_read", input_names=["x", "w", "scales", "biases"], output_names=["out"],
                               source=STREAM)


def stream(x, w, scales, biases, blocks_per_sm=8, threads=256):
    (out,) = stream_kernel()(inputs=[x, w, scales, biases], template=[("WORDS", w.size)],
                             grid=(132 * blocks_per_sm * threads, 1, 1), threadgroup=(threads, 1, 1),
                             output_shapes=[(1,)], output_dtypes=[mx.bfloat16])
    return out
