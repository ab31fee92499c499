"""Does the few-row kernel (quantized_matvec.py) make our compiled decoding step faster? One model, one prefilled
cache, the kernel switched on and off in turns, each turn tracing the step anew.

    python bench/studies/matvec_decode_ab.py --weights FOLDER --prompt-tokens 512 --rounds 4 --json OUT

(FOLDER as bench.py --weights-dir writes it; CUDA only, where the switch has an effect.)
"""

import argparse
import os
import statistics
from pathlib import Path

import mlx.core as mx

from decode_profile import pipelined_ms, prefilled
from study_result import write_study_result
from mlx_gemma4.decode_step import decode_step
from mlx_gemma4.quantized_matvec import SWITCH


def step_with_kernel(model, cache, on: bool):
    os.environ[SWITCH] = "1" if on else "0"
    model.compiled_steps.functions.clear()  # a trace keeps the path it was made with
    model.compiled_steps.traced.clear()
    return decode_step(model, cache)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from mlx_gemma4.loading import load_model

    model = load_model(Path(args.weights))
    cache = prefilled(model, args.prompt_tokens)
    variants = {"kernel off": False, "kernel on": True}
    for on in variants.values():  # compile each path's kernels first
        pipelined_ms(step_with_kernel(model, cache, on), 8)
    timings = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, on in variants.items():
            step = step_with_kernel(model, cache, on)
            pipelined_ms(step, 4)  # the trace
            timings[name].append(pipelined_ms(step, args.steps))
    rows = []
    print("| variant | ms per step (median, min-max) | tok/s |\n|---|---|---|")
    for name, times in timings.items():
        median = statistics.median(times)
        rows.append({"variant": name, "ms_median": median, "ms_min": min(times), "ms_max": max(times), "ms": times})
        print(f"| {name} | {median:.2f} ({min(times):.2f}-{max(times):.2f}) | {1000 / median:.1f} |")
    if args.json:
        write_study_result(args.json, "matvec_decode_ab.py", argv, rows)


if __name__ == "__main__":
    main()
