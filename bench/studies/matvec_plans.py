"""Which launch plan (quantized_matvec.launch_plan's template ints) reads the 12B's weights fastest? Every candidate
plan times the one-row product at the large linear shapes, as bench.py --kernel-table times products (replayed from
one compiled function, weights cycled through copies that overflow L2).

    python bench/studies/matvec_plans.py --json OUT

(CUDA only.) Prints, for each shape, every plan's time and GB/s, fastest first, beside the plan launch_plan picks.
"""

import argparse
import itertools
import math
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for matvec_table
from matvec_table import product_bytes, time_product, weight_copies  # noqa: E402
from study_result import write_study_result  # noqa: E402
from mlx_gemma4.quantized_matvec import few_row_matmul, launch_plan  # noqa: E402

SHAPES = [("gate+up", 30720, 3840), ("down", 3840, 15360), ("qkv (sliding)", 8192, 3840), ("o (sliding)", 3840, 4096)]
BITS, GROUP_SIZE = 4, 64


def candidate_plans(output_rows: int, input_dims: int) -> list:
    chunks = input_dims // 64  # 4-bit group-64 chunks: 4 lanes x 2 words x 8 codes
    plans = []
    for tiles, split, depth, pipeline in itertools.product((1, 2), (8, 16), (2, 4), (False, True)):
        if depth * tiles <= 8 and split <= chunks:
            plans.append({"RT": tiles, "KSPLIT": split, "DEPTH": depth, "PIPELINE": pipeline, "NT": 1,
                          "blocks": math.ceil(output_rows / (16 * tiles))})
    return plans


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = []
    for name, output_rows, input_dims in SHAPES:
        copies = weight_copies(output_rows, input_dims, BITS)
        x = mx.random.normal((1, input_dims)).astype(mx.bfloat16)
        chosen = launch_plan(output_rows, input_dims, BITS, GROUP_SIZE, 1)
        timed = []
        for plan in candidate_plans(output_rows, input_dims):
            def product(x, w, s, b, plan=plan):
                return few_row_matmul(x, w, s, b, GROUP_SIZE, BITS, plan)

            mx.eval(product(x, *copies[0]))  # compile
            seconds = time_product(product, x, copies)
            gbps = product_bytes(output_rows, input_dims, BITS, 1) / seconds / 1e9
            picked = all(plan[k] == chosen[k] for k in ("RT", "KSPLIT", "DEPTH", "PIPELINE"))
            timed.append({"layer": name, "plan": plan, "us": seconds * 1e6, "gbps": gbps, "launch_plan_picks": picked})
        timed.sort(key=lambda entry: entry["us"])
        for entry in timed:
            plan = entry["plan"]
            print(f"{name:14s} RT={plan['RT']} KSPLIT={plan['KSPLIT']:2d} DEPTH={plan['DEPTH']} "
                  f"PIPELINE={int(plan['PIPELINE'])}: {entry['us']:7.1f} us {entry['gbps']:6.0f} GB/s"
                  f"{'  <- launch_plan' if entry['launch_plan_picks'] else ''}", flush=True)
        results.extend(timed)
        del copies
        mx.clear_cache()
    if args.json:
        write_study_result(args.json, "matvec_plans.py", argv, results)


if __name__ == "__main__":
    main()
