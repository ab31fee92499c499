"""Which GPU kernels a decoding step runs, and for how long: mlx-lm's step beside our compiled step, on the same
weights and prompt depth, read with PyTorch's profiler (CUPTI sees every kernel in the process, MLX's included).

    python bench/studies/kernel_profile.py --weights FOLDER --prompt-tokens 512,32768 --json OUT.json

(FOLDER as bench.py --weights-dir writes it; CUDA only, and torch must be importable beside MLX.) For each runtime and
depth it prints the kernels that took the most device time per step, their launches per step, and the step's total
device time against its wall time: a step whose device time is far under its wall time waits on the host.
"""

import argparse
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

from decode_profile import forward, pipelined_ms, prefilled
from study_result import write_study_result
from mlx_gemma4.decode_step import decode_step



def kernel_times(step, steps: int) -> tuple:
    """({kernel name: (device microseconds per step, launches per step)}, wall seconds per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        seconds_per_step = pipelined_ms(step, steps) / 1000
    totals, counts = defaultdict(float), defaultdict(int)
    for event in profiler.events():
        if event.device_time_total > 0:
            totals[event.name] += event.device_time_total
            counts[event.name] += 1
    return {name: (totals[name] / steps, counts[name] / steps) for name in totals}, seconds_per_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--prompt-tokens", default="512")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=15, help="kernels listed per step, most device time first")
    parser.add_argument("--ours-only", action="store_true", help="leave mlx-lm out")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from mlx_lm.utils import load_model as load_mlx_lm

    from mlx_gemma4.loading import load_model

    folder = Path(args.weights)
    runtimes = [("ours, compiled step", load_model(folder), decode_step)]
    if not args.ours_only:
        runtimes.insert(0, ("mlx-lm", load_mlx_lm(folder)[0], forward))
    results = []
    for depth in [int(n) for n in args.prompt_tokens.split(",")]:
        for name, model, make_step in runtimes:
            cache = prefilled(model, depth)
            step = make_step(model, cache)
            pipelined_ms(step, 8)  # compile every kernel first
            kernels, wall = kernel_times(step, args.steps)
            device = sum(time for time, _ in kernels.values())
            launches = sum(count for _, count in kernels.values())
            top = sorted(kernels.items(), key=lambda item: -item[1][0])[: args.top]
            print(f"\n## {name}, depth {depth}: wall {1000 * wall:.2f} ms/step, device {device / 1000:.2f} ms/step, "
                  f"{launches:.0f} kernels/step")
            for kernel, (micros, count) in top:
                print(f"  {micros:9.1f} us  {count:6.1f}x  {kernel[:150]}")
            results.append({"runtime": name, "depth": depth, "wall_ms": 1000 * wall, "device_ms": device / 1000,
                            "kernels_per_step": launches,
                            "kernels": [{"name": k, "us_per_step": t, "launches_per_step": c} for k, (t, c) in top]})
            del cache, step
            mx.clear_cache()
    if args.json:
        write_study_result(args.json, "kernel_profile.py", argv, results)


if __name__ == "__main__":
    main()
