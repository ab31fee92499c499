"""What a prefill leaves live beyond the weights and its caches' own arrays: active memory after loading, after a
prefill (twice, the second compiled already), after dropping the first token, and after dropping the caches.

    python bench/studies/prefill_live_memory.py FOLDER DEPTH      (FOLDER as bench.py --weights-dir writes it)

If the memory above weights + caches falls away only when the caches are dropped, the caches hold more than their
arrays' bytes: arrays not yet evaluated, keeping their inputs alive."""

import gc
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from mlx_gemma4 import decoding
from mlx_gemma4.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for measure
from measure import cache_bytes, random_prompt, weight_bytes  # noqa: E402

GB = 1e9


def main(folder: Path, depth: int):
    print("active at start", mx.get_active_memory() / GB)
    model = load_model(folder)
    mx.eval(model.parameters())
    weights = weight_bytes(model)
    print(f"after load: active {mx.get_active_memory() / GB:.3f} weights {weights / GB:.3f} "
          f"cache {mx.get_cache_memory() / GB:.3f}")
    gc.collect()
    mx.clear_cache()
    print(f"after gc: active {mx.get_active_memory() / GB:.3f}")
    prompt = mx.array(random_prompt(depth, model.config.text_config.vocab_size, depth))
    for turn in range(2):
        cache = model.make_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        start = time.perf_counter()
        token, logprobs = decoding.prefill(prompt, model, cache, make_sampler(0.0))
        mx.eval(token, logprobs)
        kv = cache_bytes(cache)
        active, peak = mx.get_active_memory(), mx.get_peak_memory()
        print(f"turn {turn}: {time.perf_counter() - start:.2f}s base {base / GB:.3f} peak {peak / GB:.3f} "
              f"active after {active / GB:.3f} kv {kv / GB:.3f} -> "
              f"live beyond base+kv {(active - base - kv) / GB:.3f}, peak beyond base+kv {(peak - base - kv) / GB:.3f}")
        del token, logprobs
        gc.collect()
        print(f"   after del token: active {mx.get_active_memory() / GB:.3f}")
        kinds = {}
        for layer_cache in cache:
            count, held = kinds.get(type(layer_cache).__name__, (0, 0))
            kinds[type(layer_cache).__name__] = (count + 1, held + layer_cache.nbytes)
        print("   caches", {kind: (count, round(held / GB, 3)) for kind, (count, held) in kinds.items()})
        del cache
        gc.collect()
        print(f"   after del cache: active {mx.get_active_memory() / GB:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
