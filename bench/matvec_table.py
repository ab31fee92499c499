"""The few-row quantized product against mx.quantized_matmul at every linear shape of the 12B: time, GB/s and the
cost of M rows over one row (CUDA only).

Bytes counted are the fewest a product must move: the packed weights, scales and biases, the rows of x and the
output. Each timing evaluates at least CALLS products, cycling through copies of the weights (enough to overflow the
L2 cache), and keeps the median of REPEATS such runs; every shape runs once first so that compilation stays out of
the figures.
"""

import math
import statistics
import time

import mlx.core as mx

from mlx_gemma4.quantized_matvec import few_row_matmul

GATED_GATE_UP = "gate+up (gated)"
# (name, output rows, input dims) of every quantized linear layer of the 12B, and the tied output head.
SHAPES_12B = [
    ("q (sliding)", 4096, 3840), ("k/v (sliding)", 2048, 3840), ("q (full)", 8192, 3840), ("k (full)", 512, 3840),
    ("o (sliding)", 3840, 4096), ("o (full)", 3840, 8192), ("gate+up", 30720, 3840), ("down", 3840, 15360),
    ("lm head", 262144, 3840),
    # as loading fuses them: q, k and v of a sliding layer, q and k (= v) of a full one
    ("qkv (sliding)", 8192, 3840), ("qk (full)", 8704, 3840),
    # as decoding runs it: gelu_tanh(gate) * up in our kernel's last step (mx.quantized_matmul's row: ungated)
    (GATED_GATE_UP, 30720, 3840),
]
ROWS = (1, 2, 4, 8, 16)
GROUP_SIZE = 64
CALLS = 40
REPEATS = 5
COPY_BYTES = 256 << 20  # weights made per shape, so that the queued calls read memory, not the 50 MB L2


def weight_copies(output_rows: int, input_dims: int, bits: int) -> list:
    words = input_dims * bits // 32
    groups = input_dims // GROUP_SIZE
    one = output_rows * (words * 4 + groups * 4)
    copies = math.ceil(COPY_BYTES / one)
    made = [random_weights(output_rows, input_dims, bits) for _ in range(copies)]
    mx.eval(made)
    return made


def random_weights(output_rows: int, input_dims: int, bits: int) -> tuple:
    """(packed W, scales, biases) of random codes in MLX's affine format, groups of GROUP_SIZE, not evaluated."""
    words, groups = input_dims * bits // 32, input_dims // GROUP_SIZE
    w = mx.random.randint(0, 2**31 - 1, (output_rows, words), dtype=mx.int32).view(mx.uint32)
    scales = (mx.random.uniform(shape=(output_rows, groups)) * 0.01).astype(mx.bfloat16)
    biases = (mx.random.uniform(shape=(output_rows, groups)) * -0.05).astype(mx.bfloat16)
    return w, scales, biases


def product_bytes(output_rows: int, input_dims: int, bits: int, rows: int) -> int:
    weights = output_rows * input_dims * bits // 8 + 2 * output_rows * (input_dims // GROUP_SIZE) * 2
    return weights + rows * (input_dims + output_rows) * 2


def time_product(product, x, copies: list) -> float:
    """Median seconds per product, the products replayed from one compiled function (as the decode step replays
    them), so that Python's cost of building each call stays out of the figure."""
    calls = max(CALLS, len(copies))
    order = [array for i in range(calls) for array in copies[i % len(copies)]]
    replay = mx.compile(lambda x, *arrays: [product(x, *arrays[3 * i:3 * i + 3]) for i in range(calls)])
    mx.eval(replay(x, *order))  # trace
    times = []
    for _ in range(REPEATS):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(replay(x, *order))
        mx.synchronize()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def kernel_table(bits_list=(4, 8), bandwidth_gbps: float = 4800.0, log=print, layers=None) -> list:
    """Rows of the table for every shape of SHAPES_12B, or those named in `layers`."""
    rows_out = []
    for bits in bits_list:
        def mlx(x, w, s, b):
            return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=GROUP_SIZE, bits=bits)

        for name, output_rows, input_dims in SHAPES_12B:
            if layers is not None and name not in layers:
                continue

            def ours(x, w, s, b, gated=name == GATED_GATE_UP):
                return few_row_matmul(x, w, s, b, GROUP_SIZE, bits, gated=gated)
            copies = weight_copies(output_rows, input_dims, bits)
            for rows in ROWS:
                x = mx.random.normal((rows, input_dims)).astype(mx.bfloat16)
                mx.eval(ours(x, *copies[0]), mlx(x, *copies[0]))  # compile both
                entry = {"layer": name, "shape": [output_rows, input_dims], "bits": bits, "rows": rows,
                         "bytes": product_bytes(output_rows, input_dims, bits, rows)}
                for label, product in (("ours", ours), ("mlx", mlx)):
                    seconds = time_product(product, x, copies)
                    entry[f"{label}_us"] = seconds * 1e6
                    entry[f"{label}_gbps"] = entry["bytes"] / seconds / 1e9
                    entry[f"{label}_fraction_of_bandwidth"] = entry[f"{label}_gbps"] / bandwidth_gbps
                rows_out.append(entry)
                log(f"{bits}-bit {name:14s} M={rows:2d}: ours {entry['ours_us']:8.1f} us "
                    f"{entry['ours_gbps']:7.0f} GB/s  mlx {entry['mlx_us']:8.1f} us {entry['mlx_gbps']:7.0f} GB/s")
            del copies
            mx.clear_cache()
    one_row = {(e["bits"], e["layer"]): e["ours_us"] for e in rows_out if e["rows"] == 1}
    for entry in rows_out:
        entry["ours_cost_over_one_row"] = entry["ours_us"] / one_row[(entry["bits"], entry["layer"])]
    return rows_out


def markdown_table(entries: list, bandwidth_gbps: float) -> str:
    lines = [f"| bits | layer | N x K | M | ours us | ours GB/s | % of {bandwidth_gbps:.0f} | x M=1 | mlx us | mlx GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['bits']} | {e['layer']} | {e['shape'][0]}x{e['shape'][1]} | {e['rows']} | "
                     f"{e['ours_us']:.1f} | {e['ours_gbps']:.0f} | {100 * e['ours_fraction_of_bandwidth']:.0f}% | "
                     f"{e['ours_cost_over_one_row']:.2f} | {e['mlx_us']:.1f} | {e['mlx_gbps']:.0f} |")
    return "\n".join(lines)
