"""What bounding a prefill's memory in flight (memory_bound.py) costs and saves: peak memory, its transient part and
prefill time of one prompt at each budget and pacing depth, the settings taking turns so that a drifting clock
touches all alike.

    python bench/studies/prefill_memory_bound.py --weights FOLDER --depth 16384 --budgets none,1024,256 \
        --paced-ahead 0,2 --json OUT [--warm-up-depth 8192]

(FOLDER as bench.py --weights-dir writes it; budgets in MiB, "none" leaves MLX's memory limit as it is; a pacing
depth of 0 turns memory_bound.pace off. Each setting first runs one prefill of --warm-up-depth tokens, the depth by
default, which compiles its shapes. Each row also keeps a prefill's largest peaks between two paced pieces, with the
piece, how many pieces came before it and the memory active once it was waited for: where a prefill's spikes come
from.)

--synchronize-every (a comma list) adds mx.synchronize() after paced pieces, here only: N after every N-th piece (0,
the default, never), "over" after a piece whenever the active memory is over MLX's memory limit (the chunk's budget
above the memory live when it started). The suspect it tested: waiting for a piece's evaluation does not wait for MLX
to release what the piece's commands held (a worker thread does that after a host callback, later), so under a fast
stream of pieces the held inputs could pile up; mx.synchronize waits for that release too. Since 7d15915
memory_bound.pace synchronizes over the bound itself, so "over" adds nothing to this version's prefill; it stays for
457fec9's study (bench/results/h200-prefill-memory-bound-131k-synchronize.json) to be run again there.
"""

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from study_result import write_study_result
from mlx_gemma4 import attention, decoder, decoding, memory_bound

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for measure
from measure import cache_bytes, random_prompt, weight_bytes  # noqa: E402

PACING_MODULES = [attention, decoder]

UNBOUNDED = 1 << 62


# Peaks between paced pieces a prefill keeps, the largest first.
LARGEST_PEAKS = 12


def one_prefill(model, prompt: mx.array, budget_bytes: int, paced_ahead: int, scores_per_block: int,
                synchronize_every: str) -> dict:
    decoding.PREFILL_TRANSIENT_BYTES = budget_bytes
    memory_bound.PACED_AHEAD = paced_ahead
    attention.SCORES_PER_BLOCK = scores_per_block
    cache = model.make_cache()
    mx.clear_cache()
    mx.reset_peak_memory()
    peaks = PeaksByPiece(synchronize_every)
    start = time.perf_counter()
    with peaks.recording():
        token, _ = decoding.prefill(prompt, model, cache, make_sampler(0.0))
        mx.eval(token)
    seconds = time.perf_counter() - start
    weights, kv = weight_bytes(model), cache_bytes(cache)
    return {"seconds": seconds, "peak_bytes": peaks.overall, "transient_bytes": peaks.overall - weights - kv,
            "kv_cache_bytes": kv, "weights_bytes": weights, "peak_bytes_by_piece": peaks.by_piece,
            "largest_peaks": peaks.largest}


class PeaksByPiece:
    """The peak memory between paced pieces, by the piece queued when it was reached (its caller: a layer's
    attention, a whole layer, an attention block), so that a study sees which piece sets the prefill's peak."""

    def __init__(self, synchronize_every: str = "0"):
        self.by_piece, self.overall = {}, 0
        self.synchronize_every = synchronize_every
        self.pieces, self.largest = 0, []  # pieces noted so far; the LARGEST_PEAKS largest peaks between two

    @contextmanager
    def recording(self):
        originals = {module: module.pace for module in PACING_MODULES}
        for module, pace in originals.items():
            module.pace = self.wrapped(pace, module.__name__.rsplit(".", 1)[-1])
        try:
            yield
        finally:
            for module, pace in originals.items():
                module.pace = pace
            self.note("after the last piece")

    def wrapped(self, pace, module_name: str):
        def recorded(*arrays):
            pace(*arrays)
            if self.due_to_synchronize():
                mx.synchronize()
            self.note(f"{module_name}.{sys._getframe(1).f_code.co_name}")
        return recorded

    def due_to_synchronize(self) -> bool:
        if self.synchronize_every == "over":
            return memory_bound.over_bound()
        every = int(self.synchronize_every)
        return every > 0 and self.pieces % every == 0

    def note(self, piece: str):
        peak = mx.get_peak_memory()
        self.by_piece[piece] = max(self.by_piece.get(piece, 0), peak)
        self.overall = max(self.overall, peak)
        self.largest.append({"peak_bytes": peak, "piece": piece, "pieces_before": self.pieces,
                             "active_after_bytes": mx.get_active_memory()})
        self.largest = sorted(self.largest, key=lambda entry: -entry["peak_bytes"])[:LARGEST_PEAKS]
        self.pieces += 1
        mx.reset_peak_memory()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--depth", type=int, default=16384)
    parser.add_argument("--budgets", default="none,1024,256")
    parser.add_argument("--paced-ahead", default=str(memory_bound.PACED_AHEAD))
    parser.add_argument("--scores-per-block", default=str(attention.SCORES_PER_BLOCK))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--synchronize-every", default="0")
    parser.add_argument("--warm-up-depth", type=int, help="tokens of the prefill that compiles a setting's shapes")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from mlx_gemma4.loading import load_model

    model = load_model(Path(args.weights))
    prompt = mx.array(random_prompt(args.depth, model.config.text_config.vocab_size, args.depth))
    warm_up = prompt[:args.warm_up_depth] if args.warm_up_depth else prompt
    budgets = {name: UNBOUNDED if name == "none" else int(name) << 20 for name in args.budgets.split(",")}
    settings = [(name, int(ahead), int(block), every) for name in budgets for ahead in args.paced_ahead.split(",")
                for block in args.scores_per_block.split(",") for every in args.synchronize_every.split(",")]
    for name, ahead, block, every in settings:  # compile every shape first
        one_prefill(model, warm_up, budgets[name], ahead, block, every)
    runs = {setting: [] for setting in settings}
    for _ in range(args.rounds):
        for name, ahead, block, every in settings:
            runs[name, ahead, block, every].append(
                one_prefill(model, prompt, budgets[name], ahead, block, every))
    rows = []
    print("| budget MiB | paced ahead | scores per block | synchronized every | prefill s (median, min-max) | peak GB "
          "| transient GB |\n|---|---|---|---|---|---|---|")
    for (name, ahead, block, every), measured in runs.items():
        seconds = [run["seconds"] for run in measured]
        row = {"budget_mib": name, "paced_ahead": ahead, "scores_per_block": block, "synchronize_every": every,
               "depth": args.depth,
               "seconds_median": statistics.median(seconds),
               "seconds_min": min(seconds), "seconds_max": max(seconds), "runs": measured,
               "peak_bytes": max(run["peak_bytes"] for run in measured),
               "transient_bytes": max(run["transient_bytes"] for run in measured)}
        rows.append(row)
        print(f"| {name} | {ahead} | {block} | {every} | {row['seconds_median']:.2f} "
              f"({min(seconds):.2f}-{max(seconds):.2f}) "
              f"| {row['peak_bytes'] / 1e9:.2f} | {row['transient_bytes'] / 1e9:.2f} |")
        row["peak_bytes_by_piece"] = {piece: max(run["peak_bytes_by_piece"].get(piece, 0) for run in measured)
                                      for piece in measured[0]["peak_bytes_by_piece"]}
    for row in rows:
        print(f"{row['budget_mib']} MiB, paced {row['paced_ahead']}, block {row['scores_per_block']}, synchronized "
              f"every {row['synchronize_every']}: peak GB by piece "
              + ", ".join(f"{piece} {peak / 1e9:.2f}" for piece, peak in row["peak_bytes_by_piece"].items()))
        for run in row["runs"]:
            print("  largest peaks GB (piece, pieces before, active after): " + "; ".join(
                f"{entry['peak_bytes'] / 1e9:.2f} {entry['piece']} {entry['pieces_before']} "
                f"{entry['active_after_bytes'] / 1e9:.2f}" for entry in run["largest_peaks"][:6]))
    if args.json:
        write_study_result(args.json, "prefill_memory_bound.py", argv, rows)


if __name__ == "__main__":
    main()
