"""A decoding step's norms, residual sums and rotary embeddings as three CUDA kernels a layer instead of about a dozen
MLX operations.

Around its four products a Gemma 4 layer normalises the queries, keys and values head by head, rotates the queries
and keys, and normalises and adds each sublayer's output into the residual stream: on MLX's CUDA backend each is a
kernel of its own, and for one token each costs the host a launch and the GPU a few microseconds for a few KB.
Here, for at most MAX_ROWS tokens:

- `query_key_value`: the fused q/k/v projection's output -> normalised, rotated queries and keys and normalised
  values, in the (batch, heads, tokens, head size) layout attention takes.
- `residual_then_norm`: h = x + norm(a); and norm'(h), the next sublayer's input.
- `scaled_residual`: (h + norm(m)) * layer scalar.
- `scaled_residual_then_norm`: the same, and the next layer's input norm of it (or the final norm): what a stack of
  layers runs in place of `scaled_residual`, so that no layer's input norm is a launch of its own.

Each rounds where the MLX operations round (mx.fast.rms_norm: x times the normaliser, rounded, times the weight,
rounded; sums and products rounded to the activations' dtype), summing in float32. Where the rule says no (the
CPU, Metal, prompt chunks, the switch off) the MLX operations run instead: inside `residual_then_norm`,
`scaled_residual` and `scaled_residual_then_norm`, and for the heads in `normalized_heads`, which decoder.Attention
takes from its split projections when `heads_use_kernel` says no.
"""

from functools import lru_cache
from typing import Optional, Union

import mlx.core as mx

from .cuda_backend import ACTIVATION_DTYPES, cuda_backend, switched_on
from .cuda_source import COMMON_HEADER, CudaKernel

SWITCH = "MLX_GEMMA4_FUSED_NORMS"  # "0" turns the kernels off (A/B runs)
MAX_ROWS = 16
ROW_THREADS = 512  # threads normalising one row of the residual stream

HEADER = COMMON_HEADER + r"""
// v rounded to T and back: where the MLX operations hand a T to the next one.
__device__ __forceinline__ float rounded(float v, __nv_bfloat16) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float rounded(float v, __half) { return __half2float(__float2half_rn(v)); }

__device__ __forceinline__ float warp_sum(float v) {
  #pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

// The sum of v over the block (ROW_THREADS threads), handed to every thread.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read by an earlier call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  #pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) total += scratch[w];
  return total;
}
"""

# One warp per (token, head): jobs 0..H-1 the query heads, then KVH key heads, then KVH value heads. Lane l holds
# numbers l * HALF .. of each half of the head, the pairs RoPE turns together (mx.fast.rope, traditional=False).
QKV_SOURCE = r"""
  constexpr int HALF = D / 64;
  constexpr int JOBS = H + 2 * KVH;
  using T = typename element_of<decltype(qkv)>::type;
  const int lane = threadIdx.x & 31;
  const int job = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int tokens = qkv_shape[1], width = qkv_shape[2];  // qkv is (1, tokens, width)
  if (job >= JOBS * tokens) return;
  const int token = job / JOBS, j = job % JOBS;
  int source;
  const T* weight = nullptr;
  T* out;
  if (j < H) {
    source = j * D;
    weight = q_weight;
    out = queries + ((size_t)j * tokens + token) * D;
  } else if (j < H + KVH) {
    source = j * D;
    weight = k_weight;
    out = keys + ((size_t)(j - H) * tokens + token) * D;
  } else {
    const int head = j - H - KVH;
    source = (KEYS_ARE_VALUES ? H + head : H + KVH + head) * D;
    out = values + ((size_t)head * tokens + token) * D;
  }
  const T* in = qkv + (size_t)token * width + source;
  float a[HALF], b[HALF];
  float squares = 0.0f;
  #pragma unroll
  for (int i = 0; i < HALF; ++i) {
    a[i] = to_float(in[lane * HALF + i]);
    b[i] = to_float(in[D / 2 + lane * HALF + i]);
    squares = fmaf(a[i], a[i], fmaf(b[i], b[i], squares));
  }
  const float normalizer = rsqrtf(warp_sum(squares) / D + EPS);
  #pragma unroll
  for (int i = 0; i < HALF; ++i) {
    a[i] = rounded(a[i] * normalizer, T());
    b[i] = rounded(b[i] * normalizer, T());
    if (weight != nullptr) {
      a[i] = rounded(to_float(weight[lane * HALF + i]) * a[i], T());
      b[i] = rounded(to_float(weight[D / 2 + lane * HALF + i]) * b[i], T());
    }
  }
  if (j < H + KVH) {
    const float position = float(offset[0] + token);
    #pragma unroll
    for (int i = 0; i < HALF; ++i) {
      const float inverse = 1.0 / wavelengths[lane * HALF + i];  // as mx.fast.rope: 1 / freqs in double
      const float theta = position * inverse;
      const float c = cos(theta), s = sin(theta);
      const float x1 = a[i], x2 = b[i];
      a[i] = x1 * c - x2 * s;
      b[i] = x1 * s + x2 * c;
    }
  }
  #pragma unroll
  for (int i = 0; i < HALF; ++i) {
    store(out + lane * HALF + i, a[i]);
    store(out + D / 2 + lane * HALF + i, b[i]);
  }
"""

# One block per token; thread t holds numbers t, t + ROW_THREADS, ... of the row (N of them). Everything a block
# reads is asked for first (NORM_LOADS, then a kernel's own weights), so that it waits on memory once.
NORM_LOADS = r"""
  constexpr int PER_THREAD = (N + ROW_THREADS - 1) / ROW_THREADS;
  using T = typename element_of<decltype(x)>::type;
  __shared__ float scratch[ROW_THREADS / 32];
  const size_t row = (size_t)blockIdx.x * N;
  float h[PER_THREAD], v[PER_THREAD], w[PER_THREAD];
  #pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int n = threadIdx.x + i * ROW_THREADS;
    const bool inside = n < N;
    v[i] = inside ? to_float(addend[row + n]) : 0.0f;
    h[i] = inside ? to_float(x[row + n]) : 0.0f;
    w[i] = inside ? to_float(addend_weight[n]) : 0.0f;
  }
"""

# h = x + norm(addend), rounded where the MLX operations round.
RESIDUAL = r"""
  float squares = 0.0f;
  #pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) squares = fmaf(v[i], v[i], squares);
  float normalizer = rsqrtf(block_sum<ROW_THREADS>(squares, scratch) / N + EPS);
  #pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) h[i] = rounded(h[i] + rounded(w[i] * rounded(v[i] * normalizer, T()), T()), T());
"""

# The second norm's weight (norm_weight), for the kernels that also normalise their result.
SECOND_NORM_WEIGHT = r"""
  float w2[PER_THREAD];
  #pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int n = threadIdx.x + i * ROW_THREADS;
    w2[i] = n < N ? to_float(norm_weight[n]) : 0.0f;
  }
"""


def stored_and_normed(output: str) -> str:
    """The rows h stored to `output`, and their norm with the second weight to `normed`, from the squares of h summed
    just before: as mx.fast.rms_norm would take it from the stored rows."""
    return r"""
  normalizer = rsqrtf(block_sum<ROW_THREADS>(squares, scratch) / N + EPS);
  #pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int n = threadIdx.x + i * ROW_THREADS;
    if (n < N) {
      store(""" + output + r""" + row + n, h[i]);
      store(normed + row + n, w2[i] * rounded(h[i] * normalizer, T()));
    }
  }
"""


RESIDUAL_THEN_NORM_SOURCE = NORM_LOADS + SECOND_NORM_WEIGHT + RESIDUAL + r"""
  squares = 0.0f;
  #pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) squares = fmaf(h[i], h[i], squares);
""" + stored_and_normed("residual")

SCALED_RESIDUAL_SOURCE = NORM_LOADS + r"""
  const float factor = to_float(scalar[0]);
""" + RESIDUAL + r"""
  #pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int n = threadIdx.x + i * ROW_THREADS;
    if (n < N) store(out + row + n, h[i] * factor);
  }
"""

# The layer's output (h + norm(addend)) * scalar, and the next layer's input norm of it (or the final norm), as
# mx.fast.rms_norm would take it from the stored output.
SCALED_RESIDUAL_THEN_NORM_SOURCE = NORM_LOADS + r"""
  const float factor = to_float(scalar[0]);""" + SECOND_NORM_WEIGHT + RESIDUAL + r"""
  squares = 0.0f;
  #pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    h[i] = rounded(h[i] * factor, T());
    squares = fmaf(h[i], h[i], squares);
  }
""" + stored_and_normed("out")


def header(eps: float) -> str:
    # The norms' epsilon is a constant of the model: part of the source, like the template ints.
    return HEADER + f"\n#define EPS {eps:.9e}f\n#define ROW_THREADS {ROW_THREADS}\n"


# name: (input names, output names, source)
KERNELS = {
    "qkv_heads": (["qkv", "q_weight", "k_weight", "wavelengths", "offset"], ["queries", "keys", "values"],
                  QKV_SOURCE),
    "residual_then_norm": (["x", "addend", "addend_weight", "norm_weight"], ["residual", "normed"],
                           RESIDUAL_THEN_NORM_SOURCE),
    "scaled_residual": (["x", "addend", "addend_weight", "scalar"], ["out"], SCALED_RESIDUAL_SOURCE),
    "scaled_residual_then_norm": (["x", "addend", "addend_weight", "scalar", "norm_weight"], ["out", "normed"],
                                  SCALED_RESIDUAL_THEN_NORM_SOURCE),
}


@lru_cache(maxsize=None)
def kernel(name: str, eps: float):
    input_names, output_names, source = KERNELS[name]
    return CudaKernel(name=f"gemma4_{name}", input_names=input_names, output_names=output_names, source=source,
                      header=header(eps))


def uses_kernels(x: mx.array) -> bool:
    """The rule: the CUDA backend, the switch not off, 16-bit activations, at most MAX_ROWS tokens."""
    if not (switched_on(SWITCH) and cuda_backend()):
        return False
    return x.dtype in ACTIVATION_DTYPES and x.ndim >= 2 and x.size // x.shape[-1] <= MAX_ROWS


def rms_norm(x: mx.array, weight: Optional[mx.array], eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


def heads_use_kernel(x: mx.array, head_dim: int) -> bool:
    """query_key_value's rule for a layer's input x (batch, tokens, hidden): uses_kernels, one sequence, head sizes
    a multiple of 64 (a lane holds head_dim / 64 numbers of each half)."""
    return x.shape[0] == 1 and head_dim % 64 == 0 and uses_kernels(x)


def query_key_value(qkv: mx.array, heads: int, kv_heads: int, head_dim: int, keys_are_values: bool,
                    q_weight: mx.array, k_weight: mx.array, wavelengths: mx.array, offset: Union[int, mx.array],
                    eps: float) -> tuple:
    """(queries (1, heads, tokens, head_dim), keys, values (1, kv_heads, tokens, head_dim)) from the fused
    projection's output qkv (1, tokens, width), as normalized_heads computes them from the split projections: each
    head normalised (queries and keys with their weights, values without), queries and keys rotated (RoPE of these
    `wavelengths`) from position `offset`. With `keys_are_values` the values are the keys before their norm and
    rotation. Call only where heads_use_kernel says so."""
    tokens = qkv.shape[1]
    position = offset.astype(mx.int32).reshape(1) if isinstance(offset, mx.array) else mx.array([offset], mx.int32)
    jobs = tokens * (heads + 2 * kv_heads)
    warps_per_block = 4
    blocks = -(-jobs // warps_per_block)
    shapes = [(1, heads, tokens, head_dim), (1, kv_heads, tokens, head_dim), (1, kv_heads, tokens, head_dim)]
    return tuple(kernel("qkv_heads", eps)(
        inputs=[qkv, q_weight, k_weight, wavelengths, position],  # as it is: a reshape is one more node a layer
        template=[("D", head_dim), ("H", heads), ("KVH", kv_heads), ("KEYS_ARE_VALUES", keys_are_values)],
        grid=(blocks * 32 * warps_per_block, 1, 1),
        threadgroup=(32 * warps_per_block, 1, 1),
        output_shapes=shapes,
        output_dtypes=[qkv.dtype] * 3,
    ))


def normalized_heads(raw_queries: mx.array, raw_keys: Optional[mx.array], raw_values: Optional[mx.array],
                     q_weight: mx.array, k_weight: Optional[mx.array], offset, eps: float, rope) -> tuple:
    """Queries, keys and values through MLX operations, from the projections as (batch, tokens, heads, head_dim):
    normalised, then queries and keys rotated by `rope` (decoder.RotaryEmbedding) from position `offset`. Without
    raw_keys (a layer reusing another's keys and values) keys and values are None."""
    queries = rope(rms_norm(raw_queries, q_weight, eps).transpose(0, 2, 1, 3), offset)
    if raw_keys is None:
        return queries, None, None
    keys = rope(rms_norm(raw_keys, k_weight, eps).transpose(0, 2, 1, 3), offset)
    values = rms_norm(raw_values, None, eps).transpose(0, 2, 1, 3)
    return queries, keys, values


def row_launch(kernel, inputs: list, outputs: int) -> list:
    """One block of ROW_THREADS per token of inputs[0] (x); `outputs` arrays shaped and typed as x."""
    x = inputs[0]
    width = x.shape[-1]
    return kernel(inputs=inputs, template=[("N", width)], grid=(x.size // width * ROW_THREADS, 1, 1),
                  threadgroup=(ROW_THREADS, 1, 1), output_shapes=[x.shape] * outputs, output_dtypes=[x.dtype] * outputs)


def residual_then_norm(x: mx.array, addend: mx.array, addend_weight: mx.array, norm_weight: mx.array,
                       eps: float) -> tuple:
    """(h, norm(h) with norm_weight) for h = x + norm(addend) with addend_weight."""
    if not uses_kernels(x):
        h = x + rms_norm(addend, addend_weight, eps)
        return h, rms_norm(h, norm_weight, eps)
    residual, normed = row_launch(kernel("residual_then_norm", eps), [x, addend, addend_weight, norm_weight], 2)
    return residual, normed


def scaled_residual(x: mx.array, addend: mx.array, addend_weight: mx.array, scalar: mx.array, eps: float):
    """(x + norm(addend) with addend_weight) * scalar."""
    if not (uses_kernels(x) and scalar.dtype == x.dtype):
        return (x + rms_norm(addend, addend_weight, eps)) * scalar
    (out,) = row_launch(kernel("scaled_residual", eps), [x, addend, addend_weight, scalar], 1)
    return out


def scaled_residual_then_norm(x: mx.array, addend: mx.array, addend_weight: mx.array, scalar: mx.array,
                              norm_weight: mx.array, eps: float) -> tuple:
    """(out, norm(out) with norm_weight) for out = (x + norm(addend) with addend_weight) * scalar: a layer's output
    and the next layer's input norm of it, one kernel where the rule allows."""
    if not (uses_kernels(x) and scalar.dtype == x.dtype):
        out = (x + rms_norm(addend, addend_weight, eps)) * scalar
        return out, rms_norm(out, norm_weight, eps)
    out, normed = row_launch(kernel("scaled_residual_then_norm", eps),
                             [x, addend, addend_weight, scalar, norm_weight], 2)
    return out, normed
