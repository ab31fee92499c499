"""What our CUDA kernels' sources share: the helpers every header starts with, the compaction of their text, and
`CudaKernel`, through which each kernel module (quantized_matvec.py, decode_attention.py, fused_norms.py,
cache_writes.py) makes its kernels.

MLX's CUDA backend hashes a custom kernel's whole text at every launch, to find the module it compiled: on an H200
a launch of a kernel with the few-row product's 11.6K characters cost the host 5.9 us against 3.0 for a short one
(bench/results/h200-launch-cost.log), and a compiled 12B decoding step launches ~470 of ours, some 3 MB of text. So
`CudaKernel` writes each kernel's text once to files named by their contents, in a cache directory of the user's,
and hands MLX `#include` lines for them, which NVRTC reads when it first compiles the kernel. The files' names
change with their contents, so a module MLX compiled is never taken for another text. The 12B step took 5.81 ms so
against 6.77 with the whole text, in six rounds taken in turns whose spreads overlap
(bench/results/h200-kernel-switch-ab-source-files.json).
"""

import hashlib
import os
import tempfile
from pathlib import Path

import mlx.core as mx

from .cuda_backend import switched_on

SWITCH = "MLX_GEMMA4_SOURCE_FILES"  # "0" hands MLX the whole text (A/B runs)

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

# What MLX looks for in a kernel's source to pass an input's shape, strides or number of dimensions.
SHAPE_SUFFIXES = ("_shape", "_strides", "_ndim")


def compact(source: str) -> str:
    """The source without comments and indentation: less text for MLX to hash at every launch."""
    lines = (line.split("//")[0].strip() for line in source.splitlines())
    return "\n".join(line for line in lines if line)


def source_directory() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mlx_gemma4" / "cuda_sources"


def included(text: str) -> str:
    """An `#include` line for a file holding `text`, written once under source_directory() and named by its
    contents; `text` itself where no such file can be written or named in an include line."""
    path = source_directory() / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.cuh"
    if any(character in str(path) for character in '"\\\n'):
        return text
    try:
        if not (path.is_file() and path.read_text() == text):
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written whole, then renamed: another process compiling the same kernel never reads half a file.
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as partial:
                partial.write(text)
            os.replace(partial.name, path)
    except OSError:
        return text
    # The line ends here: MLX puts the next text (the header's, `namespace mlx::core::cu {`) right after it.
    return f'#include "{path}"\n'


def shape_markers(source: str, input_names: list) -> str:
    """A comment naming the `<input>_shape`-like identifiers `source` uses, for the short text that includes it:
    MLX decides from the text it is handed which of them the kernel takes as arguments."""
    used = [name + suffix for name in input_names for suffix in SHAPE_SUFFIXES if name + suffix in source]
    return f"\n// {' '.join(used)}" if used else ""


class CudaKernel:
    """mx.fast.cuda_kernel of compacted `source` and `header`, called as MLX's kernels are: its text goes to MLX
    through `included` files unless SWITCH is "0" when it is launched (each way made once)."""

    def __init__(self, name: str, input_names: list, output_names: list, source: str, header: str = "", **options):
        self.name, self.input_names, self.output_names = name, input_names, output_names
        # Each text ends its last line: MLX puts its own text right after it, which a last `#define` would take in.
        self.source, self.header = compact(source) + "\n", compact(header) + "\n" if header else ""
        self.options = options
        self.made = {}

    def __call__(self, **launch):
        through_files = switched_on(SWITCH)
        if through_files not in self.made:
            self.made[through_files] = self.make(through_files)
        return self.made[through_files](**launch)

    def make(self, through_files: bool):
        source, header = self.source, self.header
        if through_files:
            source = included(source) + shape_markers(source, self.input_names)
            header = included(header) if header else header
        return mx.fast.cuda_kernel(name=self.name, input_names=self.input_names, output_names=self.output_names,
                                   source=source, header=header, **self.options)
