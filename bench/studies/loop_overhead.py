"""Where a decoding loop's time goes on the host: per token, the wall time and the part spent inside mx.async_eval
(handing the step's kernels to the device), for plain decoding and for the speculative loop.

    python bench/studies/loop_overhead.py --random 12b --bits 4      (on the GPU machine; random weights)

When the time in async_eval plus the Python that builds a step comes near a step's device time, decoding is bound
by the host, whatever the memory bandwidth: fewer kernels per step is then the lever, not faster kernels.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for random_model

import mlx.core as mx  # noqa: E402

from mlx_gemma4 import decoding, draft_policy, speculative  # noqa: E402
from random_model import build_random_assistant, build_random_model  # noqa: E402


class AsyncEvalClock:
    """Wraps mx.async_eval, adding up the seconds spent inside it."""

    def __init__(self):
        self.seconds, self.wrapped = 0.0, mx.async_eval

    def __call__(self, *arrays):
        start = time.perf_counter()
        self.wrapped(*arrays)
        self.seconds += time.perf_counter() - start


def plain_steps_only(policy, remaining):
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", default="12b", help="shape: tiny, small, medium, 12b")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=192)
    args = parser.parse_args(argv)
    model, config = build_random_model(args.random, args.bits)
    drafter = build_random_assistant(config, args.bits)
    prompt, count = mx.arange(100, 100 + args.prompt_tokens), args.gen_tokens
    clock = AsyncEvalClock()
    mx.async_eval = clock

    def plain(make_cache):
        return lambda: list(decoding.generate_step(prompt, model, max_tokens=count, prompt_cache=make_cache()))

    def speculative_loop(num_draft_tokens=None):
        return lambda: list(speculative.speculative_generate_step(prompt, model, drafter, max_tokens=count,
                                                                  num_draft_tokens=num_draft_tokens))

    def forced_plain_rounds():
        adaptive_next = draft_policy.DraftPolicy.next
        draft_policy.DraftPolicy.next = plain_steps_only
        try:
            return speculative_loop()()
        finally:
            draft_policy.DraftPolicy.next = adaptive_next

    runs = [
        ("plain: generate_step, compiled step over the ring buffers", plain(model.make_cache)),
        ("speculative loop, plain steps only", forced_plain_rounds),
        ("speculative loop, adaptive, random assistant", speculative_loop()),
        ("speculative loop, K=1, random assistant", speculative_loop(1)),
    ]
    print("| loop | ms per token | of which in mx.async_eval |")
    print("|---|---|---|")
    for name, run in runs:
        run(), run()  # compile every shape, settle the allocator
        timings = []
        for _ in range(3):
            clock.seconds, start = 0.0, time.perf_counter()
            run()
            timings.append((time.perf_counter() - start, clock.seconds))
        wall, in_async_eval = min(timings)
        print(f"| {name} | {1000 * wall / count:.2f} | {1000 * in_async_eval / count:.2f} |", flush=True)


if __name__ == "__main__":
    main()
