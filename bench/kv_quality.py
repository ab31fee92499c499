"""What KV cache quantization costs in quality at depth: a model's next-token distributions over a text read with a
quantized cache against the same text read with a full-precision one (mean KL divergence, top-1 agreement).

    python bench/kv_quality.py --model FOLDER --text FILE --depth 2048 --positions 256 --json OUT.json

The first depth - positions tokens are prefilled (in chunks, as generation does); the last `positions` are fed one
at a time through the compiled decode step, teacher-forced, and their distributions compared. Quantization starts at
position 0 (quantized_kv_start 0), so every key read is quantized, the sliding rings' too.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_gemma4.decode_step import decode_step  # noqa: E402
from mlx_gemma4.decoding import quantize_caches  # noqa: E402
from mlx_gemma4.loading import load  # noqa: E402

PREFILL_CHUNK = 512


def log_probabilities(model, ids: list, positions: int, kv_bits, group_size: int) -> np.ndarray:
    cache = model.make_cache()
    quantize_caches(cache, kv_bits, group_size, 0)
    prefix = len(ids) - positions
    for start in range(0, prefix, PREFILL_CHUNK):
        model(mx.array([ids[start : min(start + PREFILL_CHUNK, prefix)]]), cache=cache)
        mx.eval([c.state for c in cache])
    step = decode_step(model, cache)
    rows = []
    for token in ids[prefix:]:
        logits = step(mx.array([[token]]))[0, -1].astype(mx.float32)
        rows.append(logits - mx.logsumexp(logits))
        mx.eval(rows[-1])
    return np.array(mx.stack(rows))


def compare(exact: np.ndarray, quantized: np.ndarray) -> dict:
    kl = (np.exp(exact) * (exact - quantized)).sum(axis=-1)
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float((exact.argmax(-1) == quantized.argmax(-1)).mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True, help="a text file, repeated if shorter than --depth tokens")
    parser.add_argument("--depth", type=int, default=2048)
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--kv-bits", default="8,4")
    parser.add_argument("--kv-group-size", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    model, processor = load(args.model)
    text = Path(args.text).read_bytes()
    ids = processor.encode(text.decode("utf-8", errors="ignore"))
    while len(ids) < args.depth:
        ids = ids + ids
    ids = ids[: args.depth]
    exact = log_probabilities(model, ids, args.positions, None, args.kv_group_size)
    results = {"command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])), "model": args.model,
               "text_sha256": hashlib.sha256(text).hexdigest(), "depth": args.depth, "positions": args.positions,
               "kv_group_size": args.kv_group_size, "rows": []}
    for bits in (int(part) for part in args.kv_bits.split(",")):
        quantized = log_probabilities(model, ids, args.positions, bits, args.kv_group_size)
        results["rows"].append({"kv_bits": bits, **compare(exact, quantized)})
    print("| KV | mean KL | max KL | top-1 agreement |\n|---|---|---|---|")
    for row in results["rows"]:
        print(f"| {row['kv_bits']}-bit | {row['mean_kl']:.2e} | {row['max_kl']:.2e} "
              f"| {100 * row['top1_agreement']:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
