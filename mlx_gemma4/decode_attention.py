"""Attention for a few queries per head (a decoding step's one, a speculative verify pass's k + 1) against a whole
key/value buffer, as two CUDA kernels (split-K "flash decoding"): the keys are cut into spans, one block per query,
key head and span computes each of its query heads' running maximum, sum and weighted value sum over its span, and a
second kernel merges the spans.

MLX has no fused attention for Gemma's head sizes (256, 512): a decoding step's attention was five or six kernels a
layer (scores, mask, softmax, weighted sum, pointer set-up, copies), each a launch the host must make. Here it is
two, the scores never reach memory, and a quantized cache (kv_cache.py's triples) is read as it is stored, where
the plain path dequantized a whole copy of every full layer's cache at every step (0.5 GB a layer at 262K keys).

Every number is summed in float32 and rounded once, at the end. Each query is computed alone, exactly as it would
be in a call of its own with its own row of the mask: spans are PER_SPAN keys whatever the buffer's length, so a
longer buffer only adds spans with no visible key, which add exact zeros. A verify pass therefore gives bit for bit
the attention of one-token steps, and greedy speculative decoding the tokens of plain decoding. `attention` is the
one entry point; `uses_kernel` is the rule; everywhere else (the CPU, Metal, prompt chunks) attention.py's path runs.
"""

import math
from functools import lru_cache
from typing import Optional

import mlx.core as mx

from .cuda_backend import ACTIVATION_DTYPES, cuda_backend, switched_on
from .cuda_source import COMMON_HEADER, CudaKernel
from .kv_cache import Rows, is_quantized, quantization_of, row_count

SWITCH = "MLX_GEMMA4_DECODE_ATTENTION"  # "0" turns the kernels off (A/B runs)
# Keys beyond which a cache in the activations' dtype stays with MLX's matmuls. A warp walks its span one round of keys
# per memory latency, so very long spans are slow: on an H200, the 12B decoded at 38.3 tok/s 262K keys deep with an
# 8-bit cache through these kernels (bench/results/h200-12b-4bit-long-context-kv8-262k-parallel-merge.json; 32.7
# before the merge ran in parallel) against 51.7 through MLX's operations at a990c85
# (h200-12b-4bit-long-context-ours-kv8.json), while at 512 they saved 0.58 ms of a 7.45 ms step
# (h200-kernel-switch-ab-512.json): up to 2,048 keys is measured. A quantized cache always takes them: MLX's CUDA
# backend would dequantize a whole copy of it at every step (0.5 GB a full layer at 262K keys).
MAX_PLAIN_KEYS = 4096
# Blocks to aim for: a warp's rounds run one memory latency each, so a span's time is its rounds; ~8 blocks for each
# of an H200's 132 multiprocessors keeps a 262K-key full layer at ~130 rounds a warp.
TARGET_BLOCKS = 1024
MIN_SPAN = 16  # keys a block takes at least: below that the merge costs more than the split gains
MAX_QUERIES = 16  # queries a head the kernels take: a verify pass of up to 15 drafts
# Query heads a key head at most: a block has a warp for each (times P), and 32 warps would leave a thread 64
# registers, fewer than the span kernel takes (113-128 for head sizes 256 and 512, ptxas of CUDA 13.5 for sm_90a).
MAX_REPEATS = 16
# Spans a key head can have at most (launch_plan keeps to it): the merge keeps a weight a span in shared memory.
MAX_SPANS = TARGET_BLOCKS + 64
MERGE_THREADS = 256  # 8 warps a merge block (the kernel's PARTS)
KEY_FLOATS_PER_ROUND = 1024  # a round's keys x head size: 4 keys of 256 or 2 of 512, in 64 registers with values

HEADER = COMMON_HEADER + r"""
__device__ __forceinline__ float minus_infinity() { return __int_as_float(0xFF800000u); }

// Two 16-bit floats packed in a word, as floats.
__device__ __forceinline__ float2 unpack(uint32_t w, __nv_bfloat16) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
}
__device__ __forceinline__ float2 unpack(uint32_t w, __half) {
  return __half22float2(*reinterpret_cast<__half2*>(&w));
}

// E consecutive numbers of a row, as floats: 16-bit floats (E / 8 loads of 16 bytes) ...
template <int E, typename T>
__device__ __forceinline__ void load_row(const T* row, float (&out)[E]) {
  #pragma unroll
  for (int i = 0; i < E / 8; ++i) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row) + i);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = unpack(words[j], T());
      out[8 * i + 2 * j] = f.x;
      out[8 * i + 2 * j + 1] = f.y;
    }
  }
}

// ... or codes of BITS bits (mx.quantize's affine format: the first number in the lowest bits) with their group's
// scale and bias; E numbers never straddle a group.
template <int E, int BITS, typename S>
__device__ __forceinline__ void load_codes(const uint32_t* words, S scale, S bias, float (&out)[E]) {
  constexpr int PER_WORD = 32 / BITS, WORDS = E / PER_WORD;
  uint32_t w[WORDS];
  if constexpr (WORDS == 4) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(words));
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (WORDS == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(words));
    w[0] = v.x; w[1] = v.y;
  } else {
    w[0] = __ldg(words);
  }
  const float s = to_float(scale), b = to_float(bias);
  #pragma unroll
  for (int i = 0; i < E; ++i) {
    const uint32_t code = (w[i / PER_WORD] >> ((i % PER_WORD) * BITS)) & ((1u << BITS) - 1u);
    out[i] = fmaf(s, float(code), b);
  }
}
"""

# Template ints: D (head size), R (query heads per key head), KVH (key heads), P (warps splitting a block's keys),
# T (keys a warp takes per round), PER_SPAN (keys a span), BITS (0: keys and values in the queries' dtype; 4 or 8:
# quantized), GROUP. Block b takes query b / (KVH spans), key head b / spans % KVH and span b % spans; warp w takes
# query head w % R and every P-th round of T keys. Lane l holds numbers l * E .. l * E + E - 1 of a row (E = D / 32).
SPAN_SOURCE = r"""
  constexpr int E = D / 32;
  using QT = typename element_of<decltype(queries)>::type;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = warp % R, part = warp / R;
  const int S = keys_shape[2], Q = queries_shape[2];
  const int spans = gridDim.x / (KVH * Q);
  const int query = blockIdx.x / (KVH * spans);
  const int kvh = blockIdx.x / spans % KVH, span = blockIdx.x % spans;
  const int begin = span * PER_SPAN, end = min(S, begin + PER_SPAN);
  const int head = kvh * R + r;
  const size_t rows = (size_t)kvh * S;  // this key head's first row

  float q[E], acc[E];
  {
    const uint4* qp = reinterpret_cast<const uint4*>(queries + ((size_t)head * Q + query) * D + lane * E);
    #pragma unroll
    for (int i = 0; i < E / 8; ++i) {
      const uint4 v = qp[i];
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
      #pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = unpack(words[j], QT());
        q[8 * i + 2 * j] = f.x;
        q[8 * i + 2 * j + 1] = f.y;
      }
    }
  }
  #pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.0f;
  float m = minus_infinity(), l = 0.0f;

  for (int first = begin + part * T; first < end; first += P * T) {
    // The round's visible keys and values are all asked for before any is used: one memory latency a round.
    // Hidden keys (the unwritten rows of a full layer's buffer) are never read.
    bool visible[T];
    float k[T][E], v[T][E];
    #pragma unroll
    for (int j = 0; j < T; ++j) {
      const int t = first + j;
      visible[j] = t < end && VISIBLE(t);  // the same for the whole warp
      if (visible[j]) {
        LOAD(keys, key, k[j]);
        LOAD(values, value, v[j]);
      }
    }
    float s[T];
    float round_max = minus_infinity();
    #pragma unroll
    for (int j = 0; j < T; ++j) {
      float dot = 0.0f;
      if (visible[j]) {
        #pragma unroll
        for (int e = 0; e < E; ++e) dot = fmaf(q[e], k[j][e], dot);
      }
      #pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xFFFFFFFFu, dot, offset);
      s[j] = visible[j] ? dot : minus_infinity();
      round_max = fmaxf(round_max, s[j]);
    }
    if (round_max == minus_infinity()) continue;
    const float new_m = fmaxf(m, round_max);
    const float rescale = expf(m - new_m);  // 0 while nothing was seen yet
    l *= rescale;
    #pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= rescale;
    #pragma unroll
    for (int j = 0; j < T; ++j) {
      if (!visible[j]) continue;
      const float p = expf(s[j] - new_m);
      l += p;
      #pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = fmaf(p, v[j][e], acc[e]);
    }
    m = new_m;
  }

  // The P warps of a query head merge their states; the first writes the span's.
  if constexpr (P > 1) {
    __shared__ float shared_acc[P][R][D];
    __shared__ float shared_ml[P][R][2];
    #pragma unroll
    for (int e = 0; e < E; ++e) shared_acc[part][r][lane * E + e] = acc[e];
    if (lane == 0) {
      shared_ml[part][r][0] = m;
      shared_ml[part][r][1] = l;
    }
    __syncthreads();
    if (part != 0) return;
    float top = minus_infinity();
    #pragma unroll
    for (int p = 0; p < P; ++p) top = fmaxf(top, shared_ml[p][r][0]);
    l = 0.0f;
    #pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.0f;
    if (top != minus_infinity()) {
      #pragma unroll
      for (int p = 0; p < P; ++p) {
        const float weight = expf(shared_ml[p][r][0] - top);
        l = fmaf(weight, shared_ml[p][r][1], l);
        #pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = fmaf(weight, shared_acc[p][r][lane * E + e], acc[e]);
      }
    }
    m = top;
  }
  const size_t at = (((size_t)query * KVH + kvh) * spans + span) * R + r;
  #pragma unroll
  for (int e = 0; e < E; ++e) span_acc[at * D + lane * E + e] = acc[e];
  if (lane == 0) {
    span_ml[at * 2] = m;
    span_ml[at * 2 + 1] = l;
  }
"""

# LOAD(rows, prefix, out): row t of a key head's keys or values into `out`, as stored; VISIBLE(t): the mask. Macros,
# because a kernel's parameters are only those its inputs name: a quantized cache has scales and biases, a masked
# call a mask.
PLAIN_LOAD = "#define LOAD(rows_, prefix, out) load_row<E>(rows_ + (rows + t) * D + lane * E, out)\n"
QUANTIZED_LOAD = (
    "#define LOAD(rows_, prefix, out) load_codes<E, BITS>(rows_ + (rows + t) * (D * BITS / 32) + lane * E * BITS / 32, "
    "prefix##_scales[(rows + t) * (D / GROUP) + lane * E / GROUP], "
    "prefix##_biases[(rows + t) * (D / GROUP) + lane * E / GROUP], out)\n"
)
MASKED = "#define VISIBLE(t) mask[(size_t)query * S + t]\n"
UNMASKED = "#define VISIBLE(t) true\n"

# Block b merges the spans of query b / (heads D / 32), query head b / (D / 32) % heads for its 32 numbers
# (b % (D / 32)) of the head, with 8 warps (R, D as above); span_ml is (queries, KVH, spans, R, 2). Every step is
# parallel over spans, so that the merge takes a few memory latencies, not one a span: the span weights
# exp(m_s - top) go to shared memory once, and warp p sums spans p, p + 8, ... for the block's 32 numbers
# (lane = number) before the 8 partial sums are added in order. Spans with no visible key weigh exactly 0.
MERGE_SOURCE = r"""
  constexpr int SLICES = D / 32, PARTS = 8;
  __shared__ float weight[MAX_SPANS];
  __shared__ float reduced[PARTS];
  __shared__ float partial[PARTS][32];
  const int Q = span_ml_shape[0], KVH = span_ml_shape[1], spans = span_ml_shape[2];
  const int query = blockIdx.x / (KVH * R * SLICES);
  const int head = blockIdx.x / SLICES % (KVH * R), slice = blockIdx.x % SLICES;
  const int kvh = head / R, r = head % R;
  const int lane = threadIdx.x & 31, part = threadIdx.x >> 5;
  const size_t first = ((size_t)query * KVH + kvh) * spans * R + r;  // span 0 of this query and head
  const float* ml = span_ml + first * 2;  // span s at ml[s * R * 2]

  // The block's sum over its threads of `value`, in an order fixed by the thread count alone; every thread gets it.
  auto block_reduce = [&](float value, bool take_max) {
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_xor_sync(0xFFFFFFFFu, value, offset);
      value = take_max ? fmaxf(value, other) : value + other;
    }
    if (lane == 0) reduced[part] = value;
    __syncthreads();
    float all = reduced[0];
    #pragma unroll
    for (int p = 1; p < PARTS; ++p) all = take_max ? fmaxf(all, reduced[p]) : all + reduced[p];
    __syncthreads();  // `reduced` is free for the next call
    return all;
  };

  float top = minus_infinity();
  for (int s = threadIdx.x; s < spans; s += blockDim.x) top = fmaxf(top, ml[(size_t)s * R * 2]);
  top = block_reduce(top, true);
  float total = 0.0f;
  for (int s = threadIdx.x; s < spans; s += blockDim.x) {
    const float m = ml[(size_t)s * R * 2];
    const float w = m == minus_infinity() ? 0.0f : expf(m - top);  // a span with no visible key weighs nothing
    weight[s] = w;
    total = fmaf(w, ml[(size_t)s * R * 2 + 1], total);
  }
  total = block_reduce(total, false);  // its barriers also publish `weight`

  const int d = slice * 32 + lane;
  const float* acc = span_acc + first * D + d;  // span s at acc[s * R * D]
  float sum = 0.0f;
  #pragma unroll 4
  for (int s = part; s < spans; s += PARTS) sum = fmaf(weight[s], acc[(size_t)s * R * D], sum);
  partial[part][lane] = sum;
  __syncthreads();
  if (part == 0) {
    float all = partial[0][lane];
    #pragma unroll
    for (int p = 1; p < PARTS; ++p) all += partial[p][lane];
    store(out + ((size_t)head * Q + query) * D + d, all / total);
  }
"""


@lru_cache(maxsize=None)
def span_kernel(quantized: bool, masked: bool):
    keys = ["keys", "key_scales", "key_biases"] if quantized else ["keys"]
    values = ["values", "value_scales", "value_biases"] if quantized else ["values"]
    return CudaKernel(
        name="gemma4_decode_attention_spans",
        input_names=["queries", *keys, *values, *(["mask"] if masked else [])],
        output_names=["span_acc", "span_ml"],
        source=SPAN_SOURCE,
        header="\n".join([HEADER, QUANTIZED_LOAD if quantized else PLAIN_LOAD,
                           MASKED if masked else UNMASKED]),
    )


@lru_cache(maxsize=None)
def merge_kernel():
    return CudaKernel(
        name="gemma4_decode_attention_merge",
        input_names=["span_acc", "span_ml"],
        output_names=["out"],
        source=MERGE_SOURCE,
        header=HEADER + f"\nconstexpr int MAX_SPANS = {MAX_SPANS};\n",
    )


def query_masks(mask, queries: int, key_count: int) -> tuple:
    """(usable, mask as a (queries, keys) boolean array or None): the kernels take a mask row a query, shared by every
    head; a mask over the keys alone serves every query."""
    if mask is None:
        return True, None
    if not (isinstance(mask, mx.array) and mask.dtype == mx.bool_ and mask.ndim >= 1 and mask.shape[-1] == key_count):
        return False, None
    leading = mask.shape[:-1]
    if any(size != 1 for size in leading[:-1]) or (leading and leading[-1] not in (1, queries)):
        return False, None
    return True, mx.broadcast_to(mask.reshape(-1, key_count), (queries, key_count))


def uses_kernel(queries: mx.array, keys: Rows, mask) -> bool:
    """The rule: the CUDA backend, the switch not off, at most MAX_QUERIES queries a head (batch 1), head sizes a
    multiple of 256, at most MAX_REPEATS query heads a key head, 16-bit queries, keys and values in the same dtype
    (at most MAX_PLAIN_KEYS of them) or quantized at 4 or 8 bits, a mask shared by every head (None, or boolean over
    the keys or over queries and keys)."""
    if not (switched_on(SWITCH) and cuda_backend()):
        return False
    batch, heads, length, head_dim = queries.shape
    if batch != 1 or length > MAX_QUERIES or head_dim % 256 or queries.dtype not in ACTIVATION_DTYPES:
        return False
    stored = keys[0] if is_quantized(keys) else keys
    kv_heads = stored.shape[1]
    if heads % kv_heads or heads // kv_heads > MAX_REPEATS:
        return False
    if is_quantized(keys):
        bits, group_size = quantization_of(keys, head_dim)
        if bits not in (4, 8) or keys[1].dtype not in ACTIVATION_DTYPES:
            return False
    elif keys.dtype != queries.dtype or row_count(keys) > MAX_PLAIN_KEYS:
        return False
    return query_masks(mask, length, row_count(keys))[0]


def launch_plan(key_count: int, kv_heads: int, repeats: int) -> dict:
    """Keys a span (enough blocks to fill the GPU, at least MIN_SPAN keys each, a power of two so that buffers of
    nearby lengths cut their common keys alike), spans per key head and query, and the warps that split a block's
    keys (P), so that a block has at least eight warps."""
    wanted = max(MIN_SPAN, math.ceil(key_count * kv_heads / TARGET_BLOCKS))
    per_span = 1 << (wanted - 1).bit_length()
    spans = math.ceil(key_count / per_span)  # at most TARGET_BLOCKS / kv_heads + 1
    assert spans <= MAX_SPANS, spans
    return {"per_span": per_span, "spans": spans, "P": max(1, 8 // repeats)}


def attention(queries: mx.array, keys: Rows, values: Rows, mask) -> mx.array:
    """softmax(queries . keys^T, masked) . values with scale 1, for queries (1, heads, queries, head_dim); keys and
    values (1, kv_heads, keys, head_dim) or quantized triples; `mask` None or boolean over the keys, or over queries
    and keys. Call only where uses_kernel says so."""
    _, heads, length, head_dim = queries.shape
    quantized = is_quantized(keys)
    stored = keys[0] if quantized else keys
    kv_heads, key_count = stored.shape[1], stored.shape[2]
    repeats = heads // kv_heads
    _, mask = query_masks(mask, length, key_count)
    bits, group_size = quantization_of(keys, head_dim) if quantized else (0, 0)
    plan = launch_plan(key_count, kv_heads, repeats)
    threads = 32 * repeats * plan["P"]
    inputs = [queries, *(keys if quantized else [keys]), *(values if quantized else [values])]
    span_acc, span_ml = span_kernel(quantized, mask is not None)(
        inputs=inputs + ([mask] if mask is not None else []),
        template=[("D", head_dim), ("R", repeats), ("KVH", kv_heads), ("P", plan["P"]),
                  ("T", KEY_FLOATS_PER_ROUND // head_dim), ("PER_SPAN", plan["per_span"]),
                  ("BITS", bits), ("GROUP", group_size)],
        grid=(length * kv_heads * plan["spans"] * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(length, kv_heads, plan["spans"], repeats, head_dim),
                       (length, kv_heads, plan["spans"], repeats, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )
    (out,) = merge_kernel()(
        inputs=[span_acc, span_ml],
        template=[("D", head_dim), ("R", repeats)],
        grid=(length * heads * (head_dim // 32) * MERGE_THREADS, 1, 1),
        threadgroup=(MERGE_THREADS, 1, 1),
        output_shapes=[(1, heads, length, head_dim)],
        output_dtypes=[queries.dtype],
    )
    return out


def reference_attention(queries: mx.array, keys: Rows, values: Rows, mask: Optional[mx.array]) -> mx.array:
    """The same attention in float32 from plain MLX operations (dequantized keys and values), for tests."""
    head_dim = queries.shape[-1]

    def plain(rows):
        if is_quantized(rows):
            bits, group_size = quantization_of(rows, head_dim)
            return mx.dequantize(*[part.astype(mx.float32) if part.dtype != mx.uint32 else part for part in rows],
                                 group_size=group_size, bits=bits)
        return rows.astype(mx.float32)

    k, v = plain(keys), plain(values)
    repeats = queries.shape[1] // k.shape[1]
    k, v = mx.repeat(k, repeats, axis=1), mx.repeat(v, repeats, axis=1)
    scores = queries.astype(mx.float32) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    return (mx.softmax(scores, axis=-1) @ v).astype(queries.dtype)
