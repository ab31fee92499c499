"""Under ncu (-k regex:few_rows|stream_read, gpu__time_duration): every 12B product with an old source (the package
OLD_PACKAGE names) and the lean one (this tree), at several launch plans, 3 launches each; a stream over W's words as
the floor. argv[1] picks the comparison: "lean" (default; old = 29b7511) or "x-ahead" (old = 709daf0, before x was
loaded a chunk ahead and down and o took one tile a warp).
Prints LABEL lines: kernel name -> what it is, and each variant's error against the dequantized product."""
import sys
sys.path.insert(0, "bench/studies/matvec_ncu")
sys.path.insert(0, "bench")
import mlx.core as mx
import mlx.nn as nn
import variants as v
from matvec_table import random_weights
from mlx_gemma4 import quantized_matvec as qm
G = 64

FEW = [(2, 8, 4), (2, 16, 4), (1, 16, 4), (2, 16, 2)]
LEAN = [("gate+up gated", 30720, 3840, True, [("old", (2, 4, 4)), ("lean", (2, 4, 4))]),
        ("down", 3840, 15360, False, [("old", (2, 8, 4)), ("old", (2, 16, 4))] + [("lean", p) for p in FEW]),
        ("o sliding", 3840, 4096, False, [("old", (2, 8, 4)), ("old", (2, 16, 4))] + [("lean", p) for p in FEW]),
        ("qkv sliding", 8192, 3840, False, [("old", (2, 8, 4))] + [("lean", p) for p in FEW[:3]]),
        ("qk full", 8704, 3840, False, [("old", (2, 8, 4)), ("lean", (2, 8, 4)), ("lean", (2, 16, 4))]),
        ("o full", 3840, 8192, False, [("old", (2, 8, 4)), ("lean", (2, 8, 4)), ("lean", (2, 16, 4))]),
        ("lm head", 262144, 3840, False, [("old", (2, 4, 4)), ("lean", (2, 4, 4))])]
RT2, RT1 = (2, 16, 4), (1, 16, 4)
X_AHEAD = [("gate+up gated", 30720, 3840, True, [("old", (2, 4, 4)), ("lean", (2, 4, 4))]),
           ("down", 3840, 15360, False, [("old", RT2), ("lean", RT2), ("old", RT1), ("lean", RT1)]),
           ("o sliding", 3840, 4096, False, [("old", RT2), ("lean", RT2), ("lean", RT1)]),
           ("qkv sliding", 8192, 3840, False, [("old", RT2), ("lean", RT2), ("lean", (2, 8, 4))]),
           ("qk full", 8704, 3840, False, [("old", RT2), ("lean", RT2), ("lean", (2, 8, 4))]),
           ("o full", 3840, 8192, False, [("old", RT2), ("lean", RT2), ("lean", RT1)]),
           ("lm head", 262144, 3840, False, [("old", (2, 4, 4)), ("lean", (2, 4, 4))])]
# Which plans of the old source also run at four rows, beside the default one.
COMPARISONS = {"lean": (LEAN, ((2, 8, 4), (2, 4, 4))), "x-ahead": (X_AHEAD, ())}
SHAPES, OLD_AT_FOUR_ROWS = COMPARISONS[sys.argv[1] if len(sys.argv) > 1 else "lean"]
for name, N, K, gated, cands in SHAPES:
    w, s, b = random_weights(N, K, 4)
    mx.eval(w, s, b)
    default = qm.launch_plan(N, K, 4, G, 1)
    default = (default["RT"], default["KSPLIT"], default["STAGES"])
    for M in (1, 4):
        x = mx.random.normal((M, K)).astype(mx.bfloat16)
        ref = qm.reference_quantized_matmul(x, w, s, b, G, 4).astype(mx.float32)
        if gated:
            g_, u_ = mx.split(ref.astype(mx.bfloat16).astype(mx.float32), 2, axis=-1)
            ref = nn.gelu_approx(g_) * u_
        outs = {}
        for src, p in cands:
            if M == 4 and not (p == default or (src == "old" and p in OLD_AT_FOUR_ROWS)):
                continue
            tag = f"{src} RT{p[0]} KS{p[1]} ST{p[2]}" + (" (new default)" if src == "lean" and p == default else "")
            kname = (f"gemma4_few_rows_{src}_4_{G}_{N}_{K}_{p[0]}_{p[1]}_{p[2]}_{1 if M <= 8 else 2}_t_"
                     f"{'t' if gated else 'f'}")
            for _ in range(3):
                out = v.matmul(src, x, w, s, b, G, 4, gated=gated, tiles_split_stages=p)
                mx.eval(out)
            err = (mx.linalg.norm(out.astype(mx.float32) - ref) / mx.linalg.norm(ref)).item()
            outs[(src, p)] = out
            print(f"LABEL {kname}|{name}|M={M}|{tag}|err {err:.1e}", flush=True)
        if ("old", default) in outs and ("lean", default) in outs:
            same = mx.array_equal(outs[("old", default)], outs[("lean", default)]).item()
            print(f"SAME {name} M={M} old==lean at {default}: {same}")
        if M == 1:
            for _ in range(3):
                mx.eval(v.stream(x, w, s, b))
            print(f"LABEL stream_read_{w.size}|{name}|M=1|stream (floor)|", flush=True)
    del w, s, b
    mx.clear_cache()
print("done")
