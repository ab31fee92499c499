"""Two plain decoding steps of the random 12B (512-token prompt) between cuProfilerStart/Stop, for
ncu --profile-from-start off: every kernel's duration, serialized."""
import ctypes
from pathlib import Path
import mlx.core as mx
from mlx_gemma4.loading import load_model
from mlx_gemma4 import decoding
cuda = ctypes.CDLL("libcuda.so.1")
model = load_model(Path("/tmp/w12b"))
prompt = mx.arange(512) % 200000 + 10
gen = decoding.generate_step(prompt, model, max_tokens=40)
for _ in range(30):
    next(gen)
mx.synchronize()
cuda.cuProfilerStart()
next(gen)
next(gen)
mx.synchronize()
cuda.cuProfilerStop()
for _ in gen:
    pass
print("done", flush=True)
