"""Where a plain decoding step's time goes when nothing overlaps: building the graph, mx.async_eval (host encode and
launch), then waiting for the GPU. Random 12B, 512-token prompt; medians over 48 steps after 16 warm ones.
    python bench/studies/host_bound_step/split.py LABEL      (weights in /tmp/w12b: bench/random_model.py's
    build_random_model('12b', 4, 0) and save_converted; argv[1] labels the output line)
If the GPU finishes a step's kernels soon after async_eval returns, it has kept up with the host handing them over."""
import statistics
import sys
import time
import mlx.core as mx
from pathlib import Path
from mlx_lm.sample_utils import make_sampler
from mlx_gemma4.loading import load_model
from mlx_gemma4 import decoding
from mlx_gemma4.decode_step import decode_step
model = load_model(Path("/tmp/w12b"))
cache = model.make_cache()
sampler = make_sampler(0.0)
token, _ = decoding.prefill(mx.arange(512) % 200000 + 10, model, cache, sampler, 2048, None, None)
step = decode_step(model, cache)
rows = []
for i in range(64):
    mx.synchronize()
    t0 = time.perf_counter()
    with mx.stream(decoding.generation_stream):
        nxt, _ = decoding.sample_last(step(token[:, None]), sampler)
    t1 = time.perf_counter()
    mx.async_eval(nxt)
    t2 = time.perf_counter()
    mx.synchronize()
    t3 = time.perf_counter()
    token = nxt
    if i >= 16:
        rows.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
med = [statistics.median(r[j] for r in rows) * 1e3 for j in range(4)]
print(f"HOSTSPLIT {sys.argv[1]} build {med[0]:.2f} ms, async_eval {med[1]:.2f} ms, wait {med[2]:.2f} ms, "
      f"serial step {med[3]:.2f} ms", flush=True)
