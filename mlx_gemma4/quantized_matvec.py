"""x @ W^T for a few rows of x and MLX's affine-quantized W, as one CUDA kernel that reads every weight once.

On the CUDA backend MLX's own quantized matmul reads a tenth of the card's bandwidth for one row and nearly a full
pass of the weights again for every further row, so decoding and the speculative verify pass are bound by it. Here
the weights stream through the tensor cores instead: a warp holds a 16-row tile of W, turns its 4- or 8-bit codes
into exact small integers in bfloat16 (float16 for float16 activations), and multiplies them with up to 16 rows of
x by `mma.m16n8k16`, accumulating in float32. Each lane loads the piece of a row that the tensor core's fragment
layout wants from it, so codes go from memory to the tensor cores without passing between lanes. Each group's
integer products are folded into the row's sum as `scale * sum(q * x) + bias * sum(x)`, the second sum taken by
one more product with a tile of ones.

Every output row is summed in an order fixed by the weight's shape alone (which warp takes which slice of K, the
order of the slices and of the final sum across warps), never by how many rows of x come along: a row's result is
bit-for-bit the same in a pass of one row as in a pass of sixteen, so a speculative verify pass gives the logits
of one-token steps.

`quantized_matmul` is the one entry point; `uses_kernel` is the rule; `reference_quantized_matmul` the plain-MLX
product the kernel is tested against.
"""

import math
from functools import lru_cache

import mlx.core as mx

from .cuda_backend import ACTIVATION_DTYPES, cuda_backend, switched_on
from .cuda_source import COMMON_HEADER, compact

# "0" turns the kernel off (for A/B runs). On by default: on an H200 at the 12B shape, our compiled decoding step took
# 8.34 ms with it against 10.77 ms without, kernel on and off in turns (bench/results/h200-matvec-decode-ab.json).
SWITCH = "MLX_GEMMA4_MATVEC"
MAX_ROWS = 16  # rows of x one pass takes: two 8-column tiles of the tensor-core product
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUPS = (32, 64, 128)
FLOAT_DTYPES = (mx.bfloat16, mx.float16, mx.float32)
# Work sizing: a block's warps split K; enough blocks to give every multiprocessor of a large GPU two or more.
MULTIPROCESSORS = 132
WIDE_TILE_ROWS = 8448  # at and above this many output rows a warp takes two 16-row tiles


HEADER = COMMON_HEADER + r"""

// Weights are read once: bypass L1 so that the rows of x, which every block reads, stay there.
template <int WORDS>
__device__ __forceinline__ void load_streaming(const uint32_t* p, uint32_t (&v)[WORDS]) {
  if constexpr (WORDS == 4) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
  } else if constexpr (WORDS == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v[0]), "=r"(v[1]) : "l"(p));
  } else {
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v[0]) : "l"(p));
  }
}

template <bool BF16>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Codes enter the tensor cores as exact small integers plus an offset: OR-ing a 4-bit code into the low mantissa
// bits of 128 (bfloat16) or 1024 (float16) gives offset + code, exactly. The fold takes offset * sum(x) back out
// (CODE_OFFSET below), which saves a subtraction for every pair of codes.
template <bool BF16>
__device__ __forceinline__ uint32_t nibble_pair(uint32_t w, int shift) {  // nibbles shift / 4 and shift / 4 + 4
  return ((w >> shift) & 0x000F000Fu) | (BF16 ? 0x43004300u : 0x64006400u);
}

// Two 8-bit codes, bytes i and j of `w`: bfloat16 has too few mantissa bits for an offset of 256, so these go
// through float and carry no offset; float16 takes them over 1024.
template <bool BF16>
__device__ __forceinline__ uint32_t byte_pair(uint32_t w, int i, int j) {
  if constexpr (BF16) {
    float lo = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440 | i)) - 8388608.0f;
    float hi = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440 | j)) - 8388608.0f;
    __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  } else {
    return __byte_perm(w, 0x64u, 0x4040 | i | (j << 8));
  }
}

"""

# Template ints: BITS, GROUP, N (output rows), K, RT (16-row tiles per warp), KSPLIT (warps per block, splitting K),
# DEPTH (chunks of weights each warp loads before using them), NT (8-column tiles of x rows), X_BF16.
SOURCE = r"""
  // A chunk is what a quad of lanes (t = lane % 4) loads from one weight row at once: four consecutive pieces of
  // LOAD_WORDS words, piece t to lane t, spanning one quantization group (half of one, for 8 bits in groups of
  // 128). A tensor-core step takes four codes from each lane of the quad, so every step stays in one group.
  constexpr int LOAD_WORDS = GROUP * BITS / 128 < 4 ? GROUP * BITS / 128 : 4;
  constexpr int CODES_PER_WORD = 32 / BITS;
  constexpr int CODES_PER_LANE = LOAD_WORDS * CODES_PER_WORD;
  constexpr int CHUNK = 4 * CODES_PER_LANE;              // k values per chunk
  constexpr int CHUNKS = K / CHUNK;
  constexpr int WORDS_PER_ROW = K * BITS / 32;
  constexpr int GROUPS = K / GROUP;
  constexpr int ROWS = 16 * RT;
  constexpr uint32_t ONES = X_BF16 ? 0x3F803F80u : 0x3C003C00u;
  constexpr float CODE_OFFSET = X_BF16 ? (BITS == 4 ? 128.0f : 0.0f) : 1024.0f;
  using ScaleT = typename element_of<decltype(scales)>::type;
  __shared__ float partial[KSPLIT][ROWS][NT * 8];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int M = x_shape[0];
  const int row0 = blockIdx.x * ROWS;
  const uint32_t ones_a[4] = {ONES, ONES, ONES, ONES};

  float total[RT][NT][4];
  #pragma unroll
  for (int r = 0; r < RT; ++r)
    #pragma unroll
    for (int n = 0; n < NT; ++n)
      #pragma unroll
      for (int i = 0; i < 4; ++i) total[r][n][i] = 0.0f;

  for (int first = warp; first < CHUNKS; first += KSPLIT * DEPTH) {
    // The batch's weights, scales and biases are all asked for before any is used: one memory latency per batch.
    uint32_t loaded[DEPTH][RT][2][LOAD_WORDS];
    ScaleT scale[DEPTH][RT][2], bias[DEPTH][RT][2];
    #pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int c = first + d * KSPLIT;
      #pragma unroll
      for (int r = 0; r < RT; ++r)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row0 + r * 16 + g + 8 * h;
          if (c < CHUNKS && row < N) {
            load_streaming(w + (size_t)row * WORDS_PER_ROW + (c * 4 + t) * LOAD_WORDS, loaded[d][r][h]);
          } else {
            #pragma unroll
            for (int j = 0; j < LOAD_WORDS; ++j) loaded[d][r][h][j] = 0;
          }
          // Rows and chunks past the end read the last scales instead: those sums are never stored.
          const size_t at = (size_t)min(row, N - 1) * GROUPS + min(c * CHUNK / GROUP, GROUPS - 1);
          scale[d][r][h] = scales[at];
          bias[d][r][h] = biases[at];
        }
    }
    #pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int c = first + d * KSPLIT;
      if (c >= CHUNKS) break;  // the same for the whole warp
      float acc[RT][NT][4], sums[NT][4];
      #pragma unroll
      for (int n = 0; n < NT; ++n)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
          sums[n][i] = 0.0f;
          #pragma unroll
          for (int r = 0; r < RT; ++r) acc[r][n][i] = 0.0f;
        }
      #pragma unroll
      for (int j = 0; j < LOAD_WORDS; ++j) {
        const int k = c * CHUNK + t * CODES_PER_LANE + j * CODES_PER_WORD;  // this lane's codes of word j
        if constexpr (BITS == 4) {
          uint4 xs[NT];
          #pragma unroll
          for (int n = 0; n < NT; ++n) {
            const int m = n * 8 + g;
            xs[n] = m < M ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + k)) : make_uint4(0, 0, 0, 0);
          }
          #pragma unroll
          for (int step = 0; step < 2; ++step) {
            uint32_t b0[NT], b1[NT];
            #pragma unroll
            for (int n = 0; n < NT; ++n) {
              const uint32_t lo = step ? xs[n].y : xs[n].x, hi = step ? xs[n].w : xs[n].z;
              b0[n] = __byte_perm(lo, hi, 0x5410);  // x[k + 2 step], x[k + 2 step + 4]
              b1[n] = __byte_perm(lo, hi, 0x7632);  // x[k + 2 step + 1], x[k + 2 step + 5]
            }
            #pragma unroll
            for (int r = 0; r < RT; ++r) {
              const uint32_t a[4] = {
                  nibble_pair<X_BF16>(loaded[d][r][0][j], 8 * step), nibble_pair<X_BF16>(loaded[d][r][1][j], 8 * step),
                  nibble_pair<X_BF16>(loaded[d][r][0][j], 8 * step + 4),
                  nibble_pair<X_BF16>(loaded[d][r][1][j], 8 * step + 4)};
              #pragma unroll
              for (int n = 0; n < NT; ++n) mma_16x8x16<X_BF16>(acc[r][n], a, b0[n], b1[n]);
            }
            #pragma unroll
            for (int n = 0; n < NT; ++n) mma_16x8x16<X_BF16>(sums[n], ones_a, b0[n], b1[n]);
          }
        } else {
          uint32_t b0[NT], b1[NT];
          #pragma unroll
          for (int n = 0; n < NT; ++n) {
            const int m = n * 8 + g;
            const uint2 xv = m < M ? __ldg(reinterpret_cast<const uint2*>(x + (size_t)m * K + k)) : make_uint2(0, 0);
            b0[n] = xv.x;
            b1[n] = xv.y;
          }
          #pragma unroll
          for (int r = 0; r < RT; ++r) {
            const uint32_t a[4] = {byte_pair<X_BF16>(loaded[d][r][0][j], 0, 1), byte_pair<X_BF16>(loaded[d][r][1][j], 0, 1),
                                   byte_pair<X_BF16>(loaded[d][r][0][j], 2, 3), byte_pair<X_BF16>(loaded[d][r][1][j], 2, 3)};
            #pragma unroll
            for (int n = 0; n < NT; ++n) mma_16x8x16<X_BF16>(acc[r][n], a, b0[n], b1[n]);
          }
          #pragma unroll
          for (int n = 0; n < NT; ++n) mma_16x8x16<X_BF16>(sums[n], ones_a, b0[n], b1[n]);
        }
      }
      #pragma unroll
      for (int r = 0; r < RT; ++r) {
        // sum((offset + q) x) s + (b - offset s) sum(x) = sum(q x) s + b sum(x)
        const float s0 = to_float(scale[d][r][0]), b0 = fmaf(-CODE_OFFSET, s0, to_float(bias[d][r][0]));
        const float s1 = to_float(scale[d][r][1]), b1 = fmaf(-CODE_OFFSET, s1, to_float(bias[d][r][1]));
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
          total[r][n][0] = fmaf(b0, sums[n][0], fmaf(s0, acc[r][n][0], total[r][n][0]));
          total[r][n][1] = fmaf(b0, sums[n][1], fmaf(s0, acc[r][n][1], total[r][n][1]));
          total[r][n][2] = fmaf(b1, sums[n][2], fmaf(s1, acc[r][n][2], total[r][n][2]));
          total[r][n][3] = fmaf(b1, sums[n][3], fmaf(s1, acc[r][n][3], total[r][n][3]));
        }
      }
    }
  }

  #pragma unroll
  for (int r = 0; r < RT; ++r)
    #pragma unroll
    for (int n = 0; n < NT; ++n) {
      partial[warp][r * 16 + g][n * 8 + 2 * t] = total[r][n][0];
      partial[warp][r * 16 + g][n * 8 + 2 * t + 1] = total[r][n][1];
      partial[warp][r * 16 + g + 8][n * 8 + 2 * t] = total[r][n][2];
      partial[warp][r * 16 + g + 8][n * 8 + 2 * t + 1] = total[r][n][3];
    }
  __syncthreads();
  for (int i = threadIdx.x; i < ROWS * NT * 8; i += KSPLIT * 32) {
    const int row = i / (NT * 8), column = i % (NT * 8);
    if (row0 + row < N && column < M) {
      float sum = 0.0f;
      #pragma unroll
      for (int s = 0; s < KSPLIT; ++s) sum += partial[s][row][column];
      store(out + (size_t)column * N + row0 + row, sum);
    }
  }
"""


@lru_cache(maxsize=None)
def few_row_kernel():
    return mx.fast.cuda_kernel(
        name="gemma4_quantized_few_rows",
        input_names=["x", "w", "scales", "biases"],
        output_names=["out"],
        source=compact(SOURCE),
        header=compact(HEADER),
    )


def launch_plan(output_rows: int, input_dims: int, bits: int, group_size: int, rows_of_x: int) -> dict:
    """Template ints for one product. Tiles per warp (RT) and the chunks each warp loads before using them (DEPTH)
    follow the size of W; how K is split among a block's warps (KSPLIT) follows W's shape and format alone, never
    the number of rows of x, so that each row's sum keeps its order."""
    load_words = min(4, group_size * bits // 128)  # per lane and chunk; a chunk spans at most one group
    chunks = input_dims // (4 * load_words * 32 // bits)
    tiles = 2 if output_rows >= WIDE_TILE_ROWS else 1
    blocks = math.ceil(output_rows / (16 * tiles))
    split = min(16 if blocks < 2 * MULTIPROCESSORS else 8, chunks)
    depth = min(max(1, min(4, 8 // load_words) // tiles), math.ceil(chunks / split))  # bytes in flight per lane
    return {"RT": tiles, "KSPLIT": split, "DEPTH": depth, "NT": 1 if rows_of_x <= 8 else 2, "blocks": blocks}


def uses_kernel(x: mx.array, w: mx.array, scales: mx.array, biases, group_size: int, bits: int, mode: str) -> bool:
    """The rule: the CUDA backend, the switch not off, MLX's affine format at 4 or 8 bits and group 32/64/128, bfloat16
    or float16 activations, at most MAX_ROWS rows of x."""
    if not (switched_on(SWITCH) and cuda_backend()):
        return False
    if mode != "affine" or biases is None or bits not in SUPPORTED_BITS or group_size not in SUPPORTED_GROUPS:
        return False
    if x.dtype not in ACTIVATION_DTYPES or scales.dtype not in FLOAT_DTYPES or w.ndim != 2 or x.ndim < 1:
        return False
    input_dims = w.shape[1] * 32 // bits
    return x.shape[-1] == input_dims and input_dims % group_size == 0 and math.prod(x.shape[:-1]) <= MAX_ROWS


def few_row_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int):
    output_rows, input_dims = w.shape[0], x.shape[-1]
    rows = x.reshape(-1, input_dims)
    plan = launch_plan(output_rows, input_dims, bits, group_size, rows.shape[0])
    threads = 32 * plan["KSPLIT"]
    out_dtype = result_dtype(x.dtype, scales.dtype)
    (out,) = few_row_kernel()(
        inputs=[rows, w, scales, biases],
        template=[("BITS", bits), ("GROUP", group_size), ("N", output_rows), ("K", input_dims),
                  ("RT", plan["RT"]), ("KSPLIT", plan["KSPLIT"]), ("DEPTH", plan["DEPTH"]), ("NT", plan["NT"]),
                  ("X_BF16", x.dtype == mx.bfloat16)],
        grid=(plan["blocks"] * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(rows.shape[0], output_rows)],
        output_dtypes=[out_dtype],
    )
    return out.reshape(*x.shape[:-1], output_rows)


def quantized_matmul(x, w, scales, biases, group_size: int, bits: int, mode: str = "affine"):
    """x @ dequantize(W)^T, as `mx.quantized_matmul(..., transpose=True)` computes it."""
    if uses_kernel(x, w, scales, biases, group_size, bits, mode):
        return few_row_matmul(x, w, scales, biases, group_size, bits)
    return mx.quantized_matmul(x, w, scales=scales, biases=biases, transpose=True, group_size=group_size, bits=bits,
                               mode=mode)


def reference_quantized_matmul(x, w, scales, biases, group_size: int, bits: int):
    """The product in float32 from the dequantized weights, cast as mx.quantized_matmul casts its result."""
    weights = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size, bits)
    return (x.astype(mx.float32) @ weights.T).astype(result_dtype(x.dtype, scales.dtype))


@lru_cache(maxsize=None)
def result_dtype(a, b):
    """The dtype MLX gives a product of `a` and `b` arrays (as mx.quantized_matmul's of x and scales)."""
    return (mx.zeros((1,), dtype=a) * mx.zeros((1,), dtype=b)).dtype
