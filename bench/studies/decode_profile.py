"""Where decode time goes: one-token steps of mlx-lm, of our model called step by step, and of our compiled step
(decode_step.py, what generate_step runs), on the same weights.

    python bench/studies/decode_profile.py --weights FOLDER   (a folder bench.py --weights-dir wrote)

A 12B decode step at 4 bits reads ~7 GB; at H100 bandwidth that is ~2 ms, yet a step takes 10-20 ms: it is bound by
the host handing ~1,000 kernels to the GPU and building the graph in Python, not by memory
(bench/results/h100-decode-profile.md). Each runtime is measured in turn, --rounds times round, so that a drifting
host clock touches all of them alike.
"""

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.decode_step import decode_step

# Prefill chunk: whole-prompt calls would hold every score of a long prompt at once.
PREFILL_CHUNK = 2048


def prefilled(model, prompt_tokens: int):
    """A cache holding `prompt_tokens` positions, prefilled in chunks as generation does."""
    cache = model.make_cache()
    ids = mx.arange(prompt_tokens) % 1000 + 10
    for start in range(0, prompt_tokens, PREFILL_CHUNK):
        mx.eval(model(ids[None, start : start + PREFILL_CHUNK], cache=cache)[:, -1], [c.state for c in cache])
    return cache


def forward(model, cache):
    return lambda token: model(token, cache=cache)


def synchronous_ms(step, steps: int) -> float:
    """Latency of one step on its own: build, run, wait."""
    token, times = mx.array([[7]]), []
    for _ in range(steps):
        start = time.perf_counter()
        mx.eval(step(token))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def pipelined_ms(step, steps: int) -> float:
    """Per step when the next step is queued before the current one is read, as generate_step runs."""
    token = mx.array([7])
    mx.eval(token)
    start = time.perf_counter()
    for _ in range(steps):
        following = mx.argmax(step(token[:, None])[:, -1], axis=-1)
        mx.async_eval(following)
        token.item()
        token = following
    token.item()
    return 1000 * (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    from mlx_lm.utils import load_model as load_mlx_lm

    from mlx_gemma4.loading import load_model

    folder = Path(args.weights)
    peer, _ = load_mlx_lm(folder)
    model = load_model(folder)
    variants = [("mlx-lm", peer, forward), ("ours, step by step", model, forward),
                ("ours, compiled step (generate_step)", model, decode_step)]
    probe, reference = mx.arange(10, 40)[None], None
    differences = {}
    for name, runtime, make_step in variants:
        cache = runtime.make_cache()
        runtime(probe, cache=cache)
        logits = make_step(runtime, cache)(mx.array([[5]])).astype(mx.float32)
        reference = logits if reference is None else reference
        differences[name] = mx.abs(logits - reference).max().item()  # a variant must compute the same model
    # One prefill per model, its variants taking turns on it: each timing continues where the last one stopped (a
    # few hundred positions deeper, nothing at a long prompt's depth), so a 131K-token prompt is prefilled twice,
    # not once per variant and round.
    caches = {}
    for name, runtime, make_step in variants:
        cache = caches.setdefault(id(runtime), prefilled(runtime, args.prompt_tokens))
        for timed in (synchronous_ms, pipelined_ms):  # compile this variant's kernels first
            timed(make_step(runtime, cache), 8)
    timings = {name: [] for name, _, _ in variants}
    for _ in range(args.rounds):
        for name, runtime, make_step in variants:
            timings[name].append(tuple(timed(make_step(runtime, caches[id(runtime)]), args.steps)
                                       for timed in (synchronous_ms, pipelined_ms)))
    print("| runtime | ms per step, synchronous | ms per step, pipelined | tok/s pipelined | max logit difference |")
    print("|---|---|---|---|---|")
    for name, _, _ in variants:
        synchronous = statistics.median(t[0] for t in timings[name])
        pipelined = statistics.median(t[1] for t in timings[name])
        print(f"| {name} | {synchronous:.2f} | {pipelined:.2f} | {1000 / pipelined:.1f} | {differences[name]:.3g} |")


if __name__ == "__main__":
    main()
