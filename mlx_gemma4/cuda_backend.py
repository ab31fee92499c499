"""Whether this process runs on MLX's CUDA backend, and the switches that turn our CUDA kernels off for A/B runs.
Every kernel has a plain-MLX fallback; these decide which one runs."""

import os

import mlx.core as mx

# The activations our kernels take: 16-bit floats, as the tensor cores and the kernels' loads want them.
ACTIVATION_DTYPES = (mx.bfloat16, mx.float16)


def cuda_backend() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def switched_on(variable: str) -> bool:
    """A kernel's switch: on unless its environment variable is "0"."""
    return os.environ.get(variable, "1") != "0"
