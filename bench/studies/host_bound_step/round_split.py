"""Where a speculative round's time goes, piece by piece, when nothing overlaps: a plain step, draft steps and
verify passes of the random 12B with the random assistant (512-token prompt), each timed as building the graph,
mx.async_eval (host encode and launch), then waiting for the GPU. Medians over 24 turns after 6 warm ones, the
pieces interleaved; the caches are trimmed back after each piece, so every turn runs at the same position.
    python bench/studies/host_bound_step/round_split.py [WEIGHTS]      (default /tmp/w12b, as split.py's)
A round of K drafts costs K draft steps plus one verify pass of K + 1 rows; against a plain step, this says which
part of that (host or GPU, drafter or target) keeps MTP from paying."""
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/, for random_model
from mlx_gemma4 import decoding, speculative  # noqa: E402
from mlx_gemma4.decode_step import decode_step  # noqa: E402
from mlx_gemma4.json_files import read_json  # noqa: E402
from mlx_gemma4.loading import load_model  # noqa: E402
from random_model import build_random_assistant  # noqa: E402

WEIGHTS = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/w12b")
model = load_model(WEIGHTS)
drafter = build_random_assistant(read_json(WEIGHTS / "config.json"), 4)
cache = model.make_cache()
recorder = speculative.LastHiddenRecorder(model)
first, _ = decoding.prefill(mx.arange(512) % 200000 + 10, recorder, cache, make_sampler(0.0), 2048, None, None)
token, hidden = first[None], recorder.last_hidden
target_step = decode_step(model, cache, return_hidden=True)
draft_step = drafter.compiled_step()
stores = speculative.store_caches(model, cache)
embed = model.language_model.model.embed


def drafts(k):
    tokens, _ = speculative.draft(draft_step, embed, token, hidden, stores, mx.array([cache[0].offset]), k, None)
    return tokens, 0


def verify_ids(ids):
    """A verify pass over `ids` as the loop queues one: the target's step, its tokens and log-probabilities."""
    logits, _ = target_step(ids)
    logits = logits[0]
    return [mx.argmax(logits, axis=-1), logits - mx.logsumexp(logits, axis=-1, keepdims=True)], ids.shape[1]


def verify(rows):
    return verify_ids(mx.concatenate([token] * rows, axis=1))


def round_of(k):
    tokens, _ = drafts(k)
    mx.async_eval(tokens)
    return verify_ids(mx.concatenate([token] + tokens, axis=1))


pieces = {"plain step (verify 1 row)": lambda: verify(1), "draft step x1": lambda: drafts(1),
          "draft steps x3": lambda: drafts(3), "verify 2 rows": lambda: verify(2), "verify 4 rows": lambda: verify(4),
          "round K=1 (draft + verify 2)": lambda: round_of(1), "round K=3 (3 drafts + verify 4)": lambda: round_of(3)}
times = {name: [] for name in pieces}
for turn in range(30):
    for name, piece in pieces.items():
        mx.synchronize()
        t0 = time.perf_counter()
        with mx.stream(decoding.generation_stream):
            outputs, written = piece()
        t1 = time.perf_counter()
        mx.async_eval(outputs)
        t2 = time.perf_counter()
        mx.synchronize()
        t3 = time.perf_counter()
        for layer_cache in cache:
            layer_cache.trim(written)
        if turn >= 6:
            times[name].append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
print("| piece | build ms | async_eval ms | wait ms | total ms |")
print("|---|---|---|---|---|")
for name, rows in times.items():
    med = [statistics.median(r[j] for r in rows) * 1e3 for j in range(4)]
    print(f"| {name} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | {med[3]:.2f} |", flush=True)
