"""M=1 (and M=8) time in bench/matvec_table.py's harness (40 products replayed from one compiled function) of: a
plain 16-byte stream over W's words, 29b7511's kernel ("old") and its x-prefetch variant, in turns; the variant
checked bit for bit against it. Result: h200-matvec-harness-vs-stream.json (OUT=DIR writes sweep2.json there)."""
import sys
import time
import statistics
import json
import os
sys.path.insert(0, "bench/studies/matvec_ncu")
sys.path.insert(0, "bench")
import mlx.core as mx
import variants as v
from matvec_table import weight_copies, product_bytes, time_product
G = 64
SHAPES = [("gate+up gated", 30720, 3840, True), ("down", 3840, 15360, False), ("o sliding", 3840, 4096, False),
          ("qkv sliding", 8192, 3840, False), ("qk full", 8704, 3840, False), ("o full", 3840, 8192, False),
          ("lm head", 262144, 3840, False)]
results = []
t0 = time.time()
for name, N, K, gated in SHAPES:
    copies = weight_copies(N, K, 4)
    w, s, b = copies[0]
    for M in (1, 8):
        x = mx.random.normal((M, K)).astype(mx.bfloat16)
        fns = {"stream": v.stream,
               "old": lambda x, w, s, b, g=gated: v.matmul("old", x, w, s, b, G, 4, gated=g),
               "xpf": lambda x, w, s, b, g=gated: v.matmul("xpf", x, w, s, b, G, 4, gated=g)}
        if M > 1:
            del fns["stream"]
        same = mx.array_equal(fns["old"](x, w, s, b), fns["xpf"](x, w, s, b)).item()
        times = {k: [] for k in fns}
        for _ in range(3):
            for k, f in fns.items():
                times[k].append(time_product(f, x, copies))
        by = product_bytes(N, K, 4, M)
        line = f"{name:14s} M={M:2d} xpf==old {same}:"
        for k in fns:
            med = statistics.median(times[k])
            results.append({"shape": name, "N": N, "K": K, "M": M, "variant": k, "us": med * 1e6,
                            "us_all": [t * 1e6 for t in times[k]], "gbps": by / med / 1e9, "same": same})
            line += f"  {k} {med*1e6:6.1f} us ({by/med/1e9:5.0f} GB/s)"
        print(line, f"[{time.time()-t0:.0f}s]", flush=True)
    del copies, w, s, b
    mx.clear_cache()
json.dump(results, open(os.environ.get("OUT", "/tmp") + "/sweep2.json", "w"), indent=1)
