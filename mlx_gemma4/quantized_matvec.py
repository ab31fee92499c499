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
from .cuda_source import CudaKernel
from .quantized_matvec_source import HEADER, SOURCE

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
# o: 240 blocks instead of 120; ncu timed down at 20.2 us against 21.2 with two tiles and the full o at 15.0 against
# 15.3, the sliding o level, bench/results/h200-matvec-ncu-plans-x-ahead.json). A gated product always takes two: a
# tile of gate rows, one of up.
TILES_PER_WARP = 2
# Warps a block at most for 4-bit weights in groups of 128 with two tiles a warp: a lane then loads four words of
# codes a chunk, and with x's next chunk and 16 rows of x held as well, ptxas (CUDA 13.5, through NVRTC for sm_90a)
# gives the kernel 134-136 registers a thread: 16 warps would ask for more than a block's 64K registers, and the
# launch would fail. Fixed by the format, not by the rows of x, so that every row keeps its order of sums.
WIDE_LOADS_MAX_SPLIT = 8
# Shared memory for a block's rings: up to MAX_STAGES chunks a warp, within this much.
SHARED_BYTES = 100 << 10
MAX_STAGES = 4


@lru_cache(maxsize=None)
def few_row_kernel(shared_bytes: int):
    """The kernel, launched with `shared_bytes` of dynamic shared memory (MLX raises a launch's limit past 48 KB)."""
    return CudaKernel(
        name="gemma4_quantized_few_rows",
        input_names=["x", "w", "scales", "biases"],
        output_names=["out"],
        source=SOURCE,
        header=HEADER,
        shared_memory=shared_bytes,
    )


def launch_plan(output_rows: int, input_dims: int, bits: int, group_size: int, rows_of_x: int,
                gated: bool = False) -> dict:
    """Template ints for one product: 16-row tiles per warp (RT, see TILES_PER_WARP); how K is split among a
    block's warps (KSPLIT) follows W's shape and format alone, never the number of rows of x, so that each row's sum
    keeps its order; each warp's ring gets as many stages (STAGES) as the shared memory holds, up to MAX_STAGES."""
    chunks = input_dims // (4 * load_words(bits, group_size) * 32 // bits)
    tiles = TILES_PER_WARP
    if not gated and math.ceil(output_rows / (16 * tiles)) <= MULTIPROCESSORS:
        tiles = 1
    split = min(4 if math.ceil(output_rows / (16 * tiles)) >= 4 * MULTIPROCESSORS else 16, chunks)
    if bits == 4 and group_size == 128 and tiles == 2:
        split = min(split, WIDE_LOADS_MAX_SPLIT)
    stages = max(2, min(MAX_STAGES, SHARED_BYTES // (split * stage_bytes(tiles, bits, group_size))))
    return sized_plan(output_rows, bits, group_size, rows_of_x, tiles, split, stages)


def load_words(bits: int, group_size: int) -> int:
    """32-bit words of a row a lane copies per chunk (the kernel's LOAD_WORDS): a chunk spans at most one group."""
    return min(4, group_size * bits // 128)


def stage_bytes(tiles: int, bits: int, group_size: int) -> int:
    """A stage of a warp's ring: its rows' chunk of weights, then a 32-bit word of scales and one of biases a row."""
    return 16 * tiles * (16 * load_words(bits, group_size) + 8)


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
