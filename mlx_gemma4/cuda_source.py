"""What our CUDA kernels' sources share: the helpers every header starts with, and the compaction MLX's launch
wants. Each kernel module (quantized_matvec.py, decode_attention.py, fused_norms.py) adds its own header after
COMMON_HEADER."""

# 16-bit floats to and from float; the element type behind an input pointer (MLX names inputs `const T*`).
COMMON_HEADER = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T> struct element_of;
template <typename T> struct element_of<const T*> { using type = T; };

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
"""


def compact(source: str) -> str:
    """The source without comments and indentation: MLX hashes the whole string at every launch."""
    lines = (line.split("//")[0].strip() for line in source.splitlines())
    return "\n".join(line for line in lines if line)
