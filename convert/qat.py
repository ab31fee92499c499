"""q4_0 quantization-aware-trained weights mapped exactly onto MLX's 4-bit affine format.

q4_0 (llama.cpp / ggml) cuts each row into blocks of 32 weights and stores, per block, one step `d` and 4-bit codes:
the weight of largest magnitude `amax` (with its sign) sets `d = amax / -8`, and a weight is `(code - 8) * d`. QAT
weights trained for q4_0 already sit on that grid, so MLX affine with group size 32, scale `d` and bias `-8 * d`
reproduces them exactly (`code * scale + bias`), where plain min/max quantization would move them.
"""

import mlx.core as mx

from mlx_gemma4.errors import Gemma4Error

BLOCK_SIZE = 32
BITS = 4
ZERO_CODE = 8  # the code of 0: codes 0..15 are levels -8..7
CODES_PER_WORD = 32 // BITS
# A bf16 weight stores its level k*d with relative error <= 2^-8, so at most 8/256 = 1/32 of a step off at the
# largest level; a weight further than 1/8 of a step from every level is not on the grid.
GRID_TOLERANCE = 0.125
# The mapping works in float32; rows are mapped this many weights at a time so that the temporaries stay small
# (the 12B's embedding alone would need several 4 GB float32 temporaries at once).
CHUNK_WEIGHTS = 1 << 22


def q4_0_steps(blocks: mx.array) -> mx.array:
    """Per block, ggml's step: the weight of largest magnitude, with its sign, divided by -8."""
    index = mx.argmax(mx.abs(blocks), axis=-1, keepdims=True)
    return mx.take_along_axis(blocks, index, axis=-1) / -ZERO_CODE


def quantize_on_grid(weight: mx.array):
    """(packed weight, scales, biases, off-grid distance in steps), all lazy; the last is checked after evaluating."""
    *rows, columns = weight.shape
    assert columns % BLOCK_SIZE == 0, "the quantization plan only picks layers whose width is a multiple of 32"
    blocks = weight.astype(mx.float32).reshape(*rows, columns // BLOCK_SIZE, BLOCK_SIZE)
    steps = q4_0_steps(blocks)
    safe_steps = mx.where(steps == 0, 1.0, steps)
    levels = mx.clip(mx.round(blocks / safe_steps), -ZERO_CODE, ZERO_CODE - 1)
    off_grid = mx.max(mx.abs(blocks - levels * steps) / mx.abs(safe_steps))

    codes = (levels + ZERO_CODE).astype(mx.uint32).reshape(*rows, columns // CODES_PER_WORD, CODES_PER_WORD)
    shifts = mx.arange(CODES_PER_WORD, dtype=mx.uint32) * BITS
    packed = mx.sum(mx.left_shift(codes, shifts), axis=-1).astype(mx.uint32)
    scales = steps.squeeze(-1)
    return packed, scales.astype(weight.dtype), (-ZERO_CODE * scales).astype(weight.dtype), off_grid


def map_in_chunks(name: str, weight: mx.array) -> tuple:
    """(packed weight, scales, biases), each a list of evaluated row blocks (written one after the other, never
    concatenated in memory); stops with Gemma4Error at the first block of rows that is off the grid."""
    rows = max(1, CHUNK_WEIGHTS // weight.shape[-1])
    pieces = []
    for start in range(0, weight.shape[0], rows):
        *outputs, off_grid = quantize_on_grid(weight[start:start + rows])
        mx.eval(*outputs, off_grid)
        if off_grid.item() > GRID_TOLERANCE:
            raise Gemma4Error(
                f"--qat: {name} is not on the q4_0 grid (a weight sits {off_grid.item():.2f} of a step from the "
                "nearest level); these are not q4_0 QAT weights, convert them with -q instead"
            )
        pieces.append(outputs)
    return tuple(list(parts) for parts in zip(*pieces))


def dequantize_q4_0(weight: mx.array) -> mx.array:
    """What llama.cpp's q4_0 makes of `weight` (for measurements): each weight moved to its block's grid."""
    *rows, columns = weight.shape
    blocks = weight.astype(mx.float32).reshape(*rows, columns // BLOCK_SIZE, BLOCK_SIZE)
    steps = q4_0_steps(blocks)
    levels = mx.clip(mx.round(blocks / mx.where(steps == 0, 1.0, steps)), -ZERO_CODE, ZERO_CODE - 1)
    return (levels * steps).reshape(weight.shape)
