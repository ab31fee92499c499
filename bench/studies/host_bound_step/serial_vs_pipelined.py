"""Serial vs pipelined plain decoding steps of the random 12B (512-token prompt, weights in /tmp/w12b as split.py's):
ms a step, and ms inside async_eval. "serial" waits for each step before building the next; "pipe" builds and hands
over the next step while the GPU runs the last one, as decoding.generate_step does; "_lp" also evaluates the
log-probabilities. If pipelining gains nothing, the host, not the GPU, sets a step's time."""
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
def run(mode, n=48):
    global token
    inside, t_start = 0.0, None
    for i in range(n + 16):
        if i == 16:
            mx.synchronize()
            t_start, inside = time.perf_counter(), 0.0
        if mode.startswith("serial"):
            mx.synchronize()
        with mx.stream(decoding.generation_stream):
            nxt, lp = decoding.sample_last(step(token[:, None]), sampler)
            lp = lp.squeeze(0)
        a = time.perf_counter()
        mx.async_eval(*((nxt, lp) if mode.endswith("lp") else (nxt,)))
        inside += time.perf_counter() - a
        if mode.startswith("pipe"):
            token.item()
        token = nxt
    mx.synchronize()
    step_ms = (time.perf_counter() - t_start) / n * 1e3
    print(f"HOSTSPLIT2 {mode:10s} step {step_ms:.2f} ms, async_eval {inside / n * 1e3:.2f} ms", flush=True)
for mode in ["serial", "serial_lp", "pipe", "pipe_lp", "serial", "pipe_lp", "pipe"]:
    run(mode)
