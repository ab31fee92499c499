"""Where a long context's transient memory comes from: a prefill chunk by chunk, its first decoding step, decoding
steps at depth, and whether writing into a buffer copies it.

    python bench/studies/long_context_memory.py FOLDER --depth 131072 --kv-bits none,8 --json OUT.json
        [--unsynchronized]     (chunks waited for with mx.eval alone, as decoding.prefill waits)

FOLDER as bench.py --weights-dir writes it. On an H200 a long prompt's transient grew with depth (62ada08: 1.0-1.3 GB
at 8K, 2.2-2.7 at 131K, 3.5-3.7 at 262K, reached before the first token; bench/results/
h200-12b-4bit-long-context-ours-split.json). The suspect: a write goes into its buffer in place only if nothing else
holds the buffer when MLX hands the write to the device, and MLX holds a command's inputs until the device has run it
(released on a thread of its own, possibly after mx.eval returns); a write queued behind a read of its buffer then
copies the whole buffer, and buffers grow with depth. The rows:

- "write into a buffer": one chunk written into a buffer of a full layer's size at that depth, after a view of it
  was read: view dropped, view kept, or the read still queued on the device. A peak of the buffer's size is a copy.
- "prefill chunk": decoding.prefill's chunks under its memory bound, each chunk's peak above the memory live before
  it and the live memory after it (synchronized or not, see above).
- "first step after the prefill finished", then "decoding at depth": steps queued while the step before runs (as
  generate_step queues them) and steps queued once it has finished, twice each way: ms a step and peak.
- "first step queued behind the prefill": decoding.prefill with its first step queued before its token is read, as
  generate_step does (the bench's "until first token" peak includes that step).
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from mlx_gemma4 import decoding
from mlx_gemma4.decode_step import decode_step
from mlx_gemma4.loading import load_model
from mlx_gemma4.memory_bound import PREFILL_TRANSIENT_BYTES, transient_memory_bound

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for measure
from measure import cache_bytes, random_prompt  # noqa: E402
from study_result import write_study_result  # noqa: E402

GB = 1e9


def peak_above(live: int) -> int:
    """The peak since mx.reset_peak_memory() above `live` (the reset peak starts at 0, not at the live memory)."""
    return max(mx.get_peak_memory(), live) - live


def write_into_buffer(rows: int, width: int, chunk: int, view: str) -> dict:
    """One chunk written into a (1, 1, rows, width) bfloat16 buffer after a view of its start was read: with the view
    dropped ("dropped"), kept ("kept"), or dropped but its read still queued on the device ("read still running": its
    sum, then a chain of small products that keeps the command running, queued just before the write; the chain's
    own arrays are a few KB, so a peak of the buffer's size is the write's copy)."""
    buffer = mx.zeros((1, 1, rows, width), mx.bfloat16)
    mx.eval(buffer)
    start_of = buffer[:, :, :chunk]
    mx.eval(start_of.sum())
    reading = None
    if view == "read still running":
        reading = start_of.sum(axis=2)
        weights = mx.random.normal((width, width)).astype(mx.bfloat16) * width ** -0.5
        mx.eval(weights)
        for _ in range(64):
            reading = reading @ weights
    if view != "kept":
        del start_of
    new = mx.ones((1, 1, chunk, width), mx.bfloat16)
    mx.eval(new)
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    if reading is not None:
        mx.async_eval(reading)
        del reading
    buffer[:, :, chunk : 2 * chunk] = new
    mx.eval(buffer)
    mx.synchronize()
    return {"case": "write into a buffer", "buffer_bytes": buffer.nbytes, "view": view,
            "peak_above_live_bytes": peak_above(before), "seconds": time.perf_counter() - start}


def prompt_of(model, depth: int, seed: int) -> mx.array:
    return mx.array(random_prompt(depth, model.config.text_config.vocab_size, seed))


def new_cache(model, kv_bits) -> list:
    cache = model.make_cache()
    decoding.quantize_caches(cache, kv_bits, 64, 0)
    return cache


def queue_step(step, token: mx.array) -> mx.array:
    """A decoding step after `token`, queued as generate_step queues it: its greedy token, not yet evaluated."""
    with mx.stream(decoding.generation_stream):
        following, _ = decoding.sample_last(step(token[:, None]), make_sampler(0.0))
    mx.async_eval(following)
    return following


def chunk_by_chunk(model, depth: int, kv_bits, seed: int, synchronized: bool) -> tuple:
    """decoding.prefill's steps for a `depth`-token random prompt, with a row a chunk; then the first decoding step,
    once the prefill has finished. `synchronized`: each chunk also waits for MLX to let go of what its commands held
    (mx.synchronize: MLX releases a command's inputs on a thread of its own once the device has run it, which may be
    after mx.eval returns), as decoding.prefill does not. (rows, the cache, the step's token)"""
    cache = new_cache(model, kv_bits)
    prompt = prompt_of(model, depth, seed)
    forward = decoding.chunk_forward(model, cache, prompt)
    chunks = decoding.prefill_chunks(depth, decoding.DEFAULT_PREFILL_STEP_SIZE)
    rows = []
    with mx.stream(decoding.generation_stream), transient_memory_bound(PREFILL_TRANSIENT_BYTES) as bound:
        for index, (start, end) in enumerate(chunks):
            live = mx.get_active_memory()
            mx.reset_peak_memory()
            began = time.perf_counter()
            bound()
            if index + 1 < len(chunks):
                decoding.evaluate_chunks(forward, [(start, end)], cache, depth - start, lambda: None)
            else:
                token, logprobs = decoding.sample_last(forward(start, end), make_sampler(0.0))
                mx.eval(token, logprobs)
            if synchronized:
                mx.synchronize()
            kv = cache_bytes(cache)
            rows.append({"case": "prefill chunk", "kv_bits": kv_bits, "depth": depth, "chunk": index, "end": end,
                         "synchronized": synchronized,
                         "seconds": time.perf_counter() - began, "live_before_bytes": live,
                         "peak_above_live_bytes": peak_above(live),
                         "live_after_bytes": mx.get_active_memory(), "kv_cache_bytes": kv})
            if index % 8 == 0 or index + 1 == len(chunks):
                print(f"kv {kv_bits} chunk {index} end {end}: {rows[-1]['seconds']:.2f} s, peak above live "
                      f"{rows[-1]['peak_above_live_bytes'] / GB:.2f} GB, live after "
                      f"{rows[-1]['live_after_bytes'] / GB:.2f} (kv {kv / GB:.2f})", flush=True)
    live = mx.get_active_memory()
    mx.reset_peak_memory()
    following = queue_step(decode_step(model, cache), token)
    following.item()
    rows.append({"case": "first step after the prefill finished", "kv_bits": kv_bits, "depth": depth,
                 "live_before_bytes": live, "peak_above_live_bytes": peak_above(live)})
    print(rows[-1], flush=True)
    return rows, cache, following


def step_queued_behind_prefill(model, depth: int, kv_bits, seed: int) -> dict:
    """decoding.prefill, and the first decoding step queued before the prefill's token is read, as generate_step
    does: the peak above the live memory before the prefill, until the token and in all. If the step cannot write
    its caches in place while the prefill's last chunk still holds them, it copies whole buffers."""
    cache = new_cache(model, kv_bits)
    prompt = prompt_of(model, depth, seed)
    live = mx.get_active_memory()
    mx.reset_peak_memory()
    token, _ = decoding.prefill(prompt, model, cache, make_sampler(0.0))
    following = queue_step(decode_step(model, cache), token)
    token.item()
    until_token = peak_above(live)
    following.item()
    row = {"case": "first step queued behind the prefill", "kv_bits": kv_bits, "depth": depth,
           "live_before_bytes": live, "peak_above_live_until_token_bytes": until_token,
           "peak_above_live_bytes": peak_above(live), "kv_cache_bytes": cache_bytes(cache)}
    print(row, flush=True)
    return row


def decoding_at_depth(model, cache: list, token: mx.array, steps: int, kv_bits, depth: int) -> list:
    """`steps` decoding steps queued behind each other, then as many each queued after the one before finished:
    ms a step and the peak above the live memory, each way."""
    step = decode_step(model, cache)
    rows = []
    for waited in (False, True, False, True):
        live = mx.get_active_memory()
        mx.reset_peak_memory()
        start = time.perf_counter()
        for _ in range(steps):
            if waited:
                token.item()
            following = queue_step(step, token)
            if not waited:
                token.item()
            token = following
        token.item()
        rows.append({"case": "decoding at depth", "kv_bits": kv_bits, "depth": depth,
                     "queued": "after the step before finished" if waited else "while the step before runs",
                     "ms_per_step": 1000 * (time.perf_counter() - start) / steps, "live_before_bytes": live,
                     "peak_above_live_bytes": peak_above(live)})
        print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--depth", type=int, default=131072)
    parser.add_argument("--kv-bits", default="none,8", help="comma-separated: none, 4, 8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=32, help="decoding steps at depth, each way, twice")
    parser.add_argument("--unsynchronized", action="store_true",
                        help="chunks waited for with mx.eval alone, as decoding.prefill waits "
                             "(default: mx.synchronize too)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    rows = []
    for view in ("dropped", "kept", "read still running"):
        rows.append(write_into_buffer(args.depth, 512, decoding.DEFAULT_PREFILL_STEP_SIZE, view))
        print(rows[-1], flush=True)
    model = load_model(args.folder)
    mx.eval(model.parameters())
    for bits in args.kv_bits.split(","):
        kv_bits = None if bits == "none" else int(bits)
        chunk_rows, cache, token = chunk_by_chunk(model, args.depth, kv_bits, args.seed, not args.unsynchronized)
        rows.extend(chunk_rows)
        rows.extend(decoding_at_depth(model, cache, token, args.steps, kv_bits, args.depth))
        del cache, token
        mx.clear_cache()
        rows.append(step_queued_behind_prefill(model, args.depth, kv_bits, args.seed))
        write_study_result(args.json, "long_context_memory.py", None, rows)  # each precision's rows as they come
        mx.clear_cache()


if __name__ == "__main__":
    main()
