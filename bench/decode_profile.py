"""Where decode time goes: one-token steps of ours and mlx-lm on the same weights, and of ours with fewer kernels.

    python bench/decode_profile.py --weights FOLDER   (a folder bench.py --keep-weights wrote)

A 12B decode step at 4 bits reads ~7 GB; at H100 bandwidth that is ~2 ms, yet a step takes ~15 ms: the step is
bound by the ~25 kernels each of 48 layers launches and by the quantized matmul kernels, not by memory. The variant
below cuts launches further, to measure what it saves before anyone changes decoder.py: the residual tails (norm,
add, layer scalar) compiled into fewer kernels. (Fusing gate and up, which load_model now does, measured 3% faster;
fusing q, k and v 11% slower: results/h100-decode-profile.md.)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_gemma4 import decoder

PROMPT_TOKENS = 512


def prefilled(model):
    cache = model.make_cache()
    mx.eval(model(mx.arange(10, 10 + PROMPT_TOKENS)[None], cache=cache))
    return cache


def synchronous_ms(model, steps: int) -> float:
    """Latency of one step on its own: build, run, wait."""
    cache, token, times = prefilled(model), mx.array([[7]]), []
    for _ in range(steps):
        start = time.perf_counter()
        mx.eval(model(token, cache=cache))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def pipelined_ms(model, steps: int) -> float:
    """Per step when the next step is queued before the current one is read, as generate_step runs."""
    cache = prefilled(model)
    token = mx.array([7])
    mx.eval(token)
    start = time.perf_counter()
    for _ in range(steps):
        following = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        mx.async_eval(following)
        token.item()
        token = following
    token.item()
    return 1000 * (time.perf_counter() - start) / steps


@mx.compile
def residual(x, y, weight, eps):
    return x + mx.fast.rms_norm(y, weight, eps)


@mx.compile
def scaled_residual(x, y, weight, eps, scalar):
    return (x + mx.fast.rms_norm(y, weight, eps)) * scalar


def compile_residuals(model):
    def compiled_call(self, x, mask, cache, offset, shared_kv):
        eps = self.post_attention_layernorm.eps
        attention = self.self_attn(self.input_layernorm(x), mask, cache, offset, shared_kv)
        h = residual(x, attention, self.post_attention_layernorm.weight, eps)
        return scaled_residual(h, self.mlp(self.pre_feedforward_layernorm(h)),
                               self.post_feedforward_layernorm.weight, eps, self.layer_scalar)

    decoder.DecoderLayer.__call__ = compiled_call


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args(argv)
    from mlx_lm.utils import load_model as load_mlx_lm

    from mlx_gemma4.loading import load_model

    folder = Path(args.weights)
    rows, probe, reference = [], mx.arange(10, 40)[None], []

    def measure(name, model):
        logits = model(probe).astype(mx.float32)
        reference.append(reference[0] if reference else logits)
        difference = mx.abs(logits - reference[0]).max().item()  # a variant must compute the same model
        synchronous_ms(model, 8), pipelined_ms(model, 8)  # compile this variant's kernels first
        rows.append((name, synchronous_ms(model, args.steps), pipelined_ms(model, args.steps), difference))
        print(f"{name}: {rows[-1][1]:.2f} ms synchronous, {rows[-1][2]:.2f} ms pipelined, "
              f"max |logit - first runtime's| {difference:.3g}", file=sys.stderr, flush=True)

    peer, _ = load_mlx_lm(folder)
    measure("mlx-lm", peer)
    del peer
    mx.clear_cache()
    model = load_model(folder)
    measure("ours (gate/up fused at load)", model)
    compile_residuals(model)
    measure("ours + compiled residuals", model)
    print("| runtime | ms per step, synchronous | ms per step, pipelined | tok/s pipelined | max logit difference |")
    print("|---|---|---|---|---|")
    for name, sync, pipelined, difference in rows:
        print(f"| {name} | {sync:.2f} | {pipelined:.2f} | {1000 / pipelined:.1f} | {difference:.3g} |")


if __name__ == "__main__":
    main()
