"""x @ W^T for a few rows of x and MLX's affine-quantized W, as one CUDA kernel that reads every weight once.

On the CUDA backend MLX's own quantized matmul reads a tenth of the card's bandwidth for one row and nearly a full
pass of the weights again for every further row, so decoding and the speculative verify pass are bound by it. Here
the weights stream through the tensor cores instead: a warp holds a 16-row tile of W, turns its 4- or 8-bit codes
into exact small integers in bfloat16 (float16 for float16 activations), and multiplies them with up to 16 rows of
x by `mma.m16n8k16`, accumulating in float32. Each group's integer products are folded into the row's sum as
`scale * sum(q * x) + bias * sum(x)`, the second sum taken by one more product with a tile of ones.

The weights reach each warp through a ring of stages in shared memory, filled by asynchronous copies (`cp.async`) a
few chunks ahead of the multiplications; each lane then reads from a stage the piece of a row that the tensor core's
fragment layout wants from it. The bytes in flight take no registers, so more warps fit on a multiprocessor than
when each warp held its next chunks in registers (52-54 registers a thread at up to 8 rows against 102 on sm_90, for
the 12B's large shapes), and a warp's loads never wait for its arithmetic.

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
# 8.34 ms with its first version against 10.77 ms without, kernel on and off in turns
# (bench/results/h200-matvec-decode-ab.json).
SWITCH = "MLX_GEMMA4_MATVEC"
# "0" keeps an MLP's gating out of the stacked gate and up product's kernel (gates_in_kernel), for A/B runs.
GATE_SWITCH = "MLX_GEMMA4_GATED_PRODUCT"
MAX_ROWS = 16  # rows of x one pass takes: two 8-column tiles of the tensor-core product
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUPS = (32, 64, 128)
FLOAT_DTYPES = (mx.bfloat16, mx.float16, mx.float32)
# Work sizing: each warp takes two 16-row tiles (its x rows' loads and the sums of x then serve 32 weight rows); a
# block's warps split K: 4 of them when there are blocks enough to fill a large GPU's 132 multiprocessors four times
# over, else 16. A warp issues an instruction only every 7-10 cycles (it waits on its loads and the tensor cores), so
# a multiprocessor needs many: with 8 warps a block, the 120 blocks of the 12B's down and o products put 8 warps on a
# multiprocessor and ncu read down at 20% of the card's bandwidth (bench/results/h200-matvec-ncu-29b7511.json);
# with 16, down took 23.5 us against 34.8 and o 10.2 against 12.0 at one row (bench/results/h200-matvec-ncu-plans.json).
MULTIPROCESSORS = 132
# Two tiles a warp, or one where even its blocks of two would not give every multiprocessor one (the 12B's down and
# o: 240 blocks instead of 120; ncu timed down at 20.6 us against 23.5 with 16 warps a block,
# bench/results/h200-matvec-ncu-plans.json). A gated product always takes two: a tile of gate rows, one of up.
TILES_PER_WARP = 2
# Shared memory for a block's rings: up to MAX_STAGES chunks a warp, within this much.
SHARED_BYTES = 100 << 10
MAX_STAGES = 4


HEADER = COMMON_HEADER + r"""

// Asynchronous copies from global to shared memory: the bytes in flight wait in shared memory, not in registers, so
// a warp can keep several stages of weights on their way while it multiplies one. Weights go through L2 only (.cg),
// leaving L1 to the rows of x, which every block reads.
__device__ __forceinline__ void copy_16_bytes(uint32_t* shared, const uint32_t* global) {
  const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(at), "l"(global));
}
__device__ __forceinline__ void copy_4_bytes(uint32_t* shared, const uint32_t* global) {
  const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(at), "l"(global));
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;"); }
template <int PENDING>
__device__ __forceinline__ void wait_copies() { asm volatile("cp.async.wait_group %0;" :: "n"(PENDING)); }

// A scale or bias from the aligned 32-bit word that holds it (16-bit values: the half `odd` names).
__device__ __forceinline__ float from_word(uint32_t word, bool odd, __nv_bfloat16*) {
  return __uint_as_float((odd ? word >> 16 : word & 0xFFFFu) << 16);
}
__device__ __forceinline__ float from_word(uint32_t word, bool odd, __half*) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(odd ? word >> 16 : word & 0xFFFFu)));
}
__device__ __forceinline__ float from_word(uint32_t word, bool, float*) { return __uint_as_float(word); }

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


// A value as the output array would hold it, back in float; and the tanh approximation of GELU (the reference's
// gelu_pytorch_tanh), for GATED products.
__device__ __forceinline__ float stored_value(__nv_bfloat16*, float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
__device__ __forceinline__ float stored_value(__half*, float v) { return __half2float(__float2half_rn(v)); }
__device__ __forceinline__ float stored_value(float*, float v) { return v; }
__device__ __forceinline__ float gelu_tanh(float v) {
  return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}
"""

# Template ints: BITS, GROUP, N (output rows), K, RT (16-row tiles per warp), KSPLIT (warps per block, splitting K),
# STAGES (chunks of weights in each warp's ring in shared memory), NT (8-column tiles of x rows), X_BF16, GATED (W is
# a stacked gate and up projection, [gate | up] by rows, and the output is gelu_tanh(gate) * up, N / 2 wide).
SOURCE = r"""
  // A chunk is what a quad of lanes (t = lane % 4) multiplies from one weight row at once: four consecutive pieces
  // of LOAD_WORDS words, piece t to lane t, spanning one quantization group (half of one, for 8 bits in groups of
  // 128). A tensor-core step takes four codes from each lane of the quad, so every step stays in one group.
  constexpr int LOAD_WORDS = GROUP * BITS / 128 < 4 ? GROUP * BITS / 128 : 4;
  constexpr int CODES_PER_WORD = 32 / BITS;
  constexpr int CODES_PER_LANE = LOAD_WORDS * CODES_PER_WORD;
  constexpr int CHUNK = 4 * CODES_PER_LANE;              // k values per chunk
  constexpr int CHUNKS = K / CHUNK;
  constexpr int WORDS_PER_ROW = K * BITS / 32;
  constexpr int GROUPS = K / GROUP;
  constexpr int ROWS = 16 * RT;
  // A stage of a warp's ring: its rows' chunk of weights (LOAD_WORDS 16-byte pieces a row), then one 32-bit word of
  // scales and one of biases a row (the aligned word holding the row's 16-bit value).
  constexpr int ROW_WORDS = 4 * LOAD_WORDS;
  constexpr int STAGE_WORDS = ROWS * ROW_WORDS + 2 * ROWS;
  constexpr uint32_t ONES = X_BF16 ? 0x3F803F80u : 0x3C003C00u;
  constexpr float CODE_OFFSET = X_BF16 ? (BITS == 4 ? 128.0f : 0.0f) : 1024.0f;
  using ScaleT = typename element_of<decltype(scales)>::type;
  constexpr int SCALES_PER_WORD = 4 / sizeof(ScaleT);
  // The warps' rings, later their partial sums: launch_plan's shared_bytes, asked for at launch.
  extern __shared__ uint4 shared_raw[];
  uint32_t* shared_words = reinterpret_cast<uint32_t*>(shared_raw);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  int M = 1;  // rows of x: x as it comes, every dimension but the last (no reshape around the launch)
  for (int i = 0; i + 1 < x_ndim; ++i) M *= x_shape[i];
  const int row0 = blockIdx.x * ROWS;
  // The weight row behind the block's local row r: its own rows; GATED, tile 0 from the gate half of W (rows 16 b
  // on) and tile 1 the same rows of the up half, so that the block ends holding both sums of each of its rows.
  auto weight_row = [&](int r) {
    return GATED ? (r / 16) * (N / 2) + blockIdx.x * 16 + r % 16 : min(row0 + r, N - 1);
  };
  const uint32_t ones_a[4] = {ONES, ONES, ONES, ONES};
  const uint32_t* scale_words = reinterpret_cast<const uint32_t*>(scales);
  const uint32_t* bias_words = reinterpret_cast<const uint32_t*>(biases);
  uint32_t* ring = shared_words + warp * STAGES * STAGE_WORDS;
  // This warp's chunks are warp, warp + KSPLIT, ...: the i-th goes to stage i % STAGES of its ring.
  const int my_chunks = warp < CHUNKS ? (CHUNKS - 1 - warp) / KSPLIT + 1 : 0;

  // A lane copies the same pieces of every chunk, so where they start (at chunk 0) is worked out once: 32-bit offsets
  // in words of W and in values of the scales and biases. Piece p of a chunk lands at word 4 p of its stage.
  static_assert((long long)N * WORDS_PER_ROW < (1ll << 32), "offsets in W are 32-bit");
  constexpr int PIECES = ROWS * LOAD_WORDS, MY_PIECES = (PIECES + 31) / 32;
  constexpr int SCALE_COPIES = 2 * ROWS, MY_SCALE_COPIES = (SCALE_COPIES + 31) / 32;  // a row's scale, then its bias
  uint32_t piece_at[MY_PIECES], group_at[MY_SCALE_COPIES];
  #pragma unroll
  for (int j = 0; j < MY_PIECES; ++j) {
    const int p = min(lane + 32 * j, PIECES - 1);  // rows past the end read the last one: never stored
    piece_at[j] = (uint32_t)weight_row(p / LOAD_WORDS) * WORDS_PER_ROW + 4 * (p % LOAD_WORDS);
  }
  #pragma unroll
  for (int j = 0; j < MY_SCALE_COPIES; ++j)
    group_at[j] = (uint32_t)weight_row(min(lane + 32 * j, SCALE_COPIES - 1) % ROWS) * GROUPS;

  // Every call commits one group of copies, empty past the last chunk, so that waiting for all but the newest
  // STAGES - 1 groups always means the oldest stage has landed.
  auto fetch = [&](int i) {
    if (i < my_chunks) {
      const int c = warp + i * KSPLIT;
      uint32_t* stage = ring + (i % STAGES) * STAGE_WORDS;
      #pragma unroll
      for (int j = 0; j < MY_PIECES; ++j) {
        const int p = lane + 32 * j;
        if (PIECES % 32 == 0 || p < PIECES) copy_16_bytes(stage + 4 * p, w + piece_at[j] + c * ROW_WORDS);
      }
      #pragma unroll
      for (int j = 0; j < MY_SCALE_COPIES; ++j) {
        const int p = lane + 32 * j;
        if (SCALE_COPIES % 32 == 0 || p < SCALE_COPIES)
          copy_4_bytes(stage + ROWS * ROW_WORDS + p,
                       (p < ROWS ? scale_words : bias_words) + (group_at[j] + c * CHUNK / GROUP) / SCALES_PER_WORD);
      }
    }
    commit_copies();
  };

  float total[RT][NT][4];
  #pragma unroll
  for (int r = 0; r < RT; ++r)
    #pragma unroll
    for (int n = 0; n < NT; ++n)
      #pragma unroll
      for (int i = 0; i < 4; ++i) total[r][n][i] = 0.0f;

  // The lane's pieces of x for a chunk (its 8 values of each word of codes, for its row of x), loaded a chunk ahead:
  // x comes from L1 or L2, and a load issued just before the products left each chunk waiting for it.
  uint4 x_next4[LOAD_WORDS][NT];
  uint2 x_next2[LOAD_WORDS][NT];
  auto load_x = [&](int i) {
    const int c = warp + i * KSPLIT;
    #pragma unroll
    for (int j = 0; j < LOAD_WORDS; ++j)
      #pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int m = n * 8 + g;
        const int k = c * CHUNK + t * CODES_PER_LANE + j * CODES_PER_WORD;  // this lane's codes of word j
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
  for (int i = 0; i < my_chunks; ++i) {
    fetch(i + STAGES - 1);
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
    __syncwarp();  // every lane's copies of stage i have landed
    const int c = warp + i * KSPLIT;
    const uint32_t* stage = ring + (i % STAGES) * STAGE_WORDS;
    uint32_t loaded[RT][2][LOAD_WORDS];
    float scale[RT][2], bias[RT][2];
    #pragma unroll
    for (int r = 0; r < RT; ++r)
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int local = r * 16 + g + 8 * h;
        #pragma unroll
        for (int j = 0; j < LOAD_WORDS; ++j) loaded[r][h][j] = stage[local * ROW_WORDS + t * LOAD_WORDS + j];
        // The half of the word that holds this group's value: with an even number of groups a row, the chunk's alone.
        const uint32_t at = (GROUPS % 2 == 0 ? 0u : (uint32_t)weight_row(local) * GROUPS) + c * CHUNK / GROUP;
        const bool odd = SCALES_PER_WORD == 2 && (at & 1);
        scale[r][h] = from_word(stage[ROWS * ROW_WORDS + local], odd, (ScaleT*)nullptr);
        bias[r][h] = from_word(stage[ROWS * ROW_WORDS + ROWS + local], odd, (ScaleT*)nullptr);
      }
    float acc[RT][NT][4], sums[NT][4];
    #pragma unroll
    for (int n = 0; n < NT; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        sums[n][e] = 0.0f;
        #pragma unroll
        for (int r = 0; r < RT; ++r) acc[r][n][e] = 0.0f;
      }
    #pragma unroll
    for (int j = 0; j < LOAD_WORDS; ++j) {
      if constexpr (BITS == 4) {
        uint4 xs[NT];
        #pragma unroll
        for (int n = 0; n < NT; ++n) xs[n] = x_now4[j][n];
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
                nibble_pair<X_BF16>(loaded[r][0][j], 8 * step), nibble_pair<X_BF16>(loaded[r][1][j], 8 * step),
                nibble_pair<X_BF16>(loaded[r][0][j], 8 * step + 4),
                nibble_pair<X_BF16>(loaded[r][1][j], 8 * step + 4)};
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
          const uint2 xv = x_now2[j][n];
          b0[n] = xv.x;
          b1[n] = xv.y;
        }
        #pragma unroll
        for (int r = 0; r < RT; ++r) {
          const uint32_t a[4] = {byte_pair<X_BF16>(loaded[r][0][j], 0, 1), byte_pair<X_BF16>(loaded[r][1][j], 0, 1),
                                 byte_pair<X_BF16>(loaded[r][0][j], 2, 3), byte_pair<X_BF16>(loaded[r][1][j], 2, 3)};
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
      const float s0 = scale[r][0], b0 = fmaf(-CODE_OFFSET, s0, bias[r][0]);
      const float s1 = scale[r][1], b1 = fmaf(-CODE_OFFSET, s1, bias[r][1]);
      #pragma unroll
      for (int n = 0; n < NT; ++n) {
        total[r][n][0] = fmaf(b0, sums[n][0], fmaf(s0, acc[r][n][0], total[r][n][0]));
        total[r][n][1] = fmaf(b0, sums[n][1], fmaf(s0, acc[r][n][1], total[r][n][1]));
        total[r][n][2] = fmaf(b1, sums[n][2], fmaf(s1, acc[r][n][2], total[r][n][2]));
        total[r][n][3] = fmaf(b1, sums[n][3], fmaf(s1, acc[r][n][3], total[r][n][3]));
      }
    }
    __syncwarp();  // stage i is free for the copies the next round starts
  }

  __syncthreads();  // every warp is done with its ring: the same shared memory now takes the warps' partial sums
  float* partial = reinterpret_cast<float*>(shared_words);
  #pragma unroll
  for (int r = 0; r < RT; ++r)
    #pragma unroll
    for (int n = 0; n < NT; ++n) {
      float* own = partial + (warp * ROWS + r * 16 + g) * NT * 8 + n * 8 + 2 * t;
      own[0] = total[r][n][0];
      own[1] = total[r][n][1];
      own[8 * NT * 8] = total[r][n][2];
      own[8 * NT * 8 + 1] = total[r][n][3];
    }
  __syncthreads();
  if constexpr (GATED) {
    // Each of the block's 16 rows: gelu_tanh(gate) * up, from its two sums rounded as the plain product stores them.
    for (int i = threadIdx.x; i < 16 * NT * 8; i += KSPLIT * 32) {
      const int row = i / (NT * 8), column = i % (NT * 8);
      if (column < M) {
        float gate = 0.0f, up = 0.0f;
        #pragma unroll
        for (int s = 0; s < KSPLIT; ++s) {
          gate += partial[(s * ROWS + row) * NT * 8 + column];
          up += partial[(s * ROWS + 16 + row) * NT * 8 + column];
        }
        const float gated = gelu_tanh(stored_value(out, gate)) * stored_value(out, up);
        store(out + (size_t)column * (N / 2) + blockIdx.x * 16 + row, gated);
      }
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * NT * 8; i += KSPLIT * 32) {
      const int row = i / (NT * 8), column = i % (NT * 8);
      if (row0 + row < N && column < M) {
        float sum = 0.0f;
        #pragma unroll
        for (int s = 0; s < KSPLIT; ++s) sum += partial[(s * ROWS + row) * NT * 8 + column];
        store(out + (size_t)column * N + row0 + row, sum);
      }
    }
  }
"""


@lru_cache(maxsize=None)
def few_row_kernel(shared_bytes: int):
    """The kernel, launched with `shared_bytes` of dynamic shared memory (MLX raises a launch's limit past 48 KB)."""
    return mx.fast.cuda_kernel(
        name="gemma4_quantized_few_rows",
        input_names=["x", "w", "scales", "biases"],
        output_names=["out"],
        source=compact(SOURCE),
        header=compact(HEADER),
        shared_memory=shared_bytes,
    )


def launch_plan(output_rows: int, input_dims: int, bits: int, group_size: int, rows_of_x: int,
                gated: bool = False) -> dict:
    """Template ints for one product: 16-row tiles per warp (RT, see TILES_PER_WARP); how K is split among a
    block's warps (KSPLIT) follows W's shape and format alone, never the number of rows of x, so that each row's sum
    keeps its order; each warp's ring gets as many stages (STAGES) as the shared memory holds, up to MAX_STAGES."""
    load_words = min(4, group_size * bits // 128)  # per lane and chunk; a chunk spans at most one group
    chunks = input_dims // (4 * load_words * 32 // bits)
    tiles = TILES_PER_WARP
    if not gated and math.ceil(output_rows / (16 * tiles)) <= MULTIPROCESSORS:
        tiles = 1
    split = min(4 if math.ceil(output_rows / (16 * tiles)) >= 4 * MULTIPROCESSORS else 16, chunks)
    stages = max(2, min(MAX_STAGES, SHARED_BYTES // (split * stage_bytes(tiles, bits, group_size))))
    return sized_plan(output_rows, bits, group_size, rows_of_x, tiles, split, stages)


def stage_bytes(tiles: int, bits: int, group_size: int) -> int:
    """A stage of a warp's ring: its rows' chunk of weights, then a 32-bit word of scales and one of biases a row."""
    load_words = min(4, group_size * bits // 128)
    return 16 * tiles * (16 * load_words + 8)


def sized_plan(output_rows: int, bits: int, group_size: int, rows_of_x: int, tiles: int, split: int,
               stages: int) -> dict:
    """The plan launch_plan's choices (or any others: bench/studies/matvec_ncu) make: blocks, columns of x and
    shared memory."""
    columns = 8 if rows_of_x <= 8 else 16
    # The rings, or after them the warps' partial sums (float32, rows x columns), whichever is larger.
    shared_bytes = max(split * stages * stage_bytes(tiles, bits, group_size), split * 16 * tiles * columns * 4)
    return {"RT": tiles, "KSPLIT": split, "STAGES": stages, "NT": columns // 8,
            "blocks": math.ceil(output_rows / (16 * tiles)), "shared_bytes": shared_bytes}


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


def few_row_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int,
                   gated: bool = False):
    """x @ W^T; `gated` (W a stacked [gate | up] projection, as gates_in_kernel allows): gelu_tanh(gate) * up."""
    plan = launch_plan(w.shape[0], x.shape[-1], bits, group_size, math.prod(x.shape[:-1]), gated)
    return launch(few_row_kernel(plan["shared_bytes"]), plan, x, w, scales, biases, group_size, bits, gated)


def launch(kernel, plan: dict, x, w, scales, biases, group_size: int, bits: int, gated: bool):
    """One launch of `kernel` (few_row_kernel's, or a variant of its source with the same template ints) by `plan`."""
    output_rows, input_dims = w.shape[0], x.shape[-1]
    threads = 32 * plan["KSPLIT"]
    # x goes in as it is: a reshape on each side would be two more nodes of the decoding step's graph per product.
    (out,) = kernel(
        inputs=[x, w, scales, biases],
        template=[("BITS", bits), ("GROUP", group_size), ("N", output_rows), ("K", input_dims),
                  ("RT", plan["RT"]), ("KSPLIT", plan["KSPLIT"]),
                  ("STAGES", plan["STAGES"]), ("NT", plan["NT"]),
                  ("X_BF16", x.dtype == mx.bfloat16), ("GATED", gated)],
        grid=(plan["blocks"] * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(*x.shape[:-1], output_rows // 2 if gated else output_rows)],
        output_dtypes=[result_dtype(x.dtype, scales.dtype)],
    )
    return out


def gates_in_kernel(x: mx.array, w: mx.array, scales: mx.array, biases, group_size: int, bits: int, mode: str) -> bool:
    """The rule for gating a stacked [gate | up] product in the kernel: the kernel's rule, GATE_SWITCH not off, and
    halves of whole 16-row tiles (each block pairs a tile of gate rows with the same rows of up)."""
    return (switched_on(GATE_SWITCH) and uses_kernel(x, w, scales, biases, group_size, bits, mode)
            and w.shape[0] % 32 == 0)


def gated_quantized_matmul(x, w, scales, biases, group_size: int, bits: int):
    """gelu_tanh(gate) * up for [gate | up] = x @ dequantize(W)^T, W a stacked gate and up projection, in the kernel's
    last step: the step launches no kernel of its own for the gating, and [gate | up] is never written out. Call only
    where gates_in_kernel allows."""
    return few_row_matmul(x, w, scales, biases, group_size, bits, gated=True)


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
