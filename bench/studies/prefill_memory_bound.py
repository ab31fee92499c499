"""What bounding a prefill's memory in flight (memory_bound.py) costs and saves: peak memory, its transient part and
prefill time of one prompt at each budget, the budgets taking turns so that a drifting clock touches all alike.

    python bench/studies/prefill_memory_bound.py --weights FOLDER --depth 16384 --budgets none,1024,256 --json OUT

(FOLDER as bench.py --weights-dir writes it; budgets in MiB, "none" leaves MLX's memory limit as it is.)
"""

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler

from study_result import write_study_result
from mlx_gemma4 import decoding

UNBOUNDED = 1 << 62


def one_prefill(model, prompt: mx.array, budget_bytes: int) -> dict:
    decoding.PREFILL_TRANSIENT_BYTES = budget_bytes
    cache = model.make_cache()
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    token, _ = decoding.prefill(prompt, model, cache, make_sampler(0.0))
    mx.eval(token)
    seconds = time.perf_counter() - start
    weights = sum(value.nbytes for _, value in tree_flatten(model.parameters()))
    kv = sum(c.nbytes for c in cache)
    return {"seconds": seconds, "peak_bytes": mx.get_peak_memory(),
            "transient_bytes": mx.get_peak_memory() - weights - kv, "kv_cache_bytes": kv, "weights_bytes": weights}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--depth", type=int, default=16384)
    parser.add_argument("--budgets", default="none,1024,256")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from mlx_gemma4.loading import load_model

    model = load_model(Path(args.weights))
    vocab = model.config.text_config.vocab_size
    prompt = mx.random.randint(16, vocab - 16, (args.depth,), key=mx.random.key(args.depth))
    budgets = {name: UNBOUNDED if name == "none" else int(name) << 20 for name in args.budgets.split(",")}
    for budget in budgets.values():  # compile every shape first
        one_prefill(model, prompt, budget)
    runs = {name: [] for name in budgets}
    for _ in range(args.rounds):
        for name, budget in budgets.items():
            runs[name].append(one_prefill(model, prompt, budget))
    rows = []
    print("| budget MiB | prefill s (median, min-max) | peak GB | transient GB |\n|---|---|---|---|")
    for name, measured in runs.items():
        seconds = [run["seconds"] for run in measured]
        row = {"budget_mib": name, "depth": args.depth, "seconds_median": statistics.median(seconds),
               "seconds_min": min(seconds), "seconds_max": max(seconds), "runs": measured,
               "peak_bytes": max(run["peak_bytes"] for run in measured),
               "transient_bytes": max(run["transient_bytes"] for run in measured)}
        rows.append(row)
        print(f"| {name} | {row['seconds_median']:.2f} ({min(seconds):.2f}-{max(seconds):.2f}) "
              f"| {row['peak_bytes'] / 1e9:.2f} | {row['transient_bytes'] / 1e9:.2f} |")
    if args.json:
        write_study_result(args.json, "prefill_memory_bound.py", argv, rows)


if __name__ == "__main__":
    main()
