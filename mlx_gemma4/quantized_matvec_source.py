"""The CUDA C++ of quantized_matvec.py's few-row kernel (its design is described there): a header of helpers and the
kernel body, as mx.fast.cuda_kernel takes them."""

from .cuda_source import COMMON_HEADER

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
