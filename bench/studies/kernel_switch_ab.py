"""Do our CUDA kernels make the compiled decoding step faster? One model, one prefilled cache, every kernel on and
then each one switched off by its environment variable, in turns, each turn tracing the step anew.

    python bench/studies/kernel_switch_ab.py --weights FOLDER --prompt-tokens 512 --rounds 4 --json OUT

(FOLDER as bench.py --weights-dir writes it; CUDA only, where the switches have an effect. --switches names the
variables, by default MLX_GEMMA4_MATVEC (quantized_matvec.py), MLX_GEMMA4_DECODE_ATTENTION (decode_attention.py),
MLX_GEMMA4_FUSED_NORMS (fused_norms.py), MLX_GEMMA4_IN_PLACE_WRITES (cache_writes.py) and MLX_GEMMA4_SOURCE_FILES
(cuda_source.py: the kernels' text handed to MLX whole); "all" adds a turn with every one of them off.)
"""

import argparse
import os
import statistics
from pathlib import Path

from decode_profile import pipelined_ms, prefilled
from study_result import write_study_result
from mlx_gemma4 import cache_writes, cuda_source, decode_attention, fused_norms, quantized_matvec
from mlx_gemma4.decode_step import decode_step

SWITCHES = [quantized_matvec.SWITCH, decode_attention.SWITCH, fused_norms.SWITCH, cache_writes.SWITCH,
            cuda_source.SWITCH]


def step_with(model, cache, switched_off: tuple):
    for switch in SWITCHES:
        os.environ[switch] = "0" if switch in switched_off else "1"
    model.compiled_steps.forget()  # a trace keeps the path it was made with
    return decode_step(model, cache)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--switches", default=",".join(SWITCHES + ["all"]))
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from mlx_gemma4.loading import load_model

    model = load_model(Path(args.weights))
    cache = prefilled(model, args.prompt_tokens)
    variants = {"every kernel on": ()}
    for switch in args.switches.split(","):
        variants["every kernel off" if switch == "all" else f"{switch}=0"] = (
            tuple(SWITCHES) if switch == "all" else (switch,))
    for off in variants.values():  # compile each path's kernels first
        pipelined_ms(step_with(model, cache, off), 8)
    timings = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, off in variants.items():
            step = step_with(model, cache, off)
            pipelined_ms(step, 4)  # the trace
            timings[name].append(pipelined_ms(step, args.steps))
    rows = []
    print("| variant | ms per step (median, min-max) | tok/s |\n|---|---|---|")
    for name, times in timings.items():
        median = statistics.median(times)
        rows.append({"variant": name, "ms_median": median, "ms_min": min(times), "ms_max": max(times), "ms": times})
        print(f"| {name} | {median:.2f} ({min(times):.2f}-{max(times):.2f}) | {1000 / median:.1f} |")
    if args.json:
        write_study_result(args.json, "kernel_switch_ab.py", argv, rows)


if __name__ == "__main__":
    main()
