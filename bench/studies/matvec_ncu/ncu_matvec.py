"""One launch of each product for ncu (-k regex:few_rows|stream_read), 29b7511's kernel ("old") and its x-prefetch
variant, and a stream over W at one row: M=1, then M=8 for gate+up and down. Result: h200-matvec-ncu-29b7511.json
(ncu_details_to_json.py)."""
import sys
sys.path.insert(0, "bench/studies/matvec_ncu")
sys.path.insert(0, "bench")
import mlx.core as mx
import variants as v
from matvec_table import random_weights
G = 64
for name, N, K, gated, M in [("gate+up gated", 30720, 3840, True, 1), ("down", 3840, 15360, False, 1),
                             ("o sliding", 3840, 4096, False, 1), ("qkv sliding", 8192, 3840, False, 1),
                             ("gate+up gated", 30720, 3840, True, 8), ("down", 3840, 15360, False, 8)]:
    w, s, b = random_weights(N, K, 4)
    x = mx.random.normal((M, K)).astype(mx.bfloat16)
    mx.eval(w, s, b, x)
    mx.eval(v.matmul("old", x, w, s, b, G, 4, gated=gated))
    mx.eval(v.matmul("xpf", x, w, s, b, G, 4, gated=gated))
    if M == 1:
        mx.eval(v.stream(x, w, s, b))
    mx.synchronize()
    print("launched", name, M, flush=True)
