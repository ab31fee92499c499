"""Where decode time goes: one-token steps of ours and mlx-lm on the same weights, and of ours with fewer kernels.

    python bench/decode_profile.py --weights FOLDER   (a folder bench.py --keep-weights wrote)

A 12B decode step at 4 bits reads ~7 GB; at H100 bandwidth that is ~2 ms, yet a step takes ~15 ms: the step is
bound by the ~27 kernels each of 48 layers launches, not by memory. The variants below cut launches, cumulatively,
to measure what each saves before anyone changes decoder.py: gate and up projections in one quantized matmul; q, k
and v in one; the residual tails (norm, add, layer scalar) compiled into fewer kernels.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

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


def stacked(linears: list) -> nn.Module:
    """One quantized (or plain) linear whose output rows are the given linears' rows in order: affine groups run
    along the input, so stacking rows keeps every group intact."""
    first = linears[0]
    if isinstance(first, nn.QuantizedLinear):
        fused = nn.QuantizedLinear(first.group_size, 1, bias=False, group_size=first.group_size, bits=first.bits)
        fused.weight = mx.concatenate([l.weight for l in linears])
        fused.scales = mx.concatenate([l.scales for l in linears])
        fused.biases = mx.concatenate([l.biases for l in linears])
        return fused
    fused = nn.Linear(1, 1, bias=False)
    fused.weight = mx.concatenate([l.weight for l in linears])
    return fused


def fuse_mlp(model):
    for layer in model.language_model.model.layers:
        mlp = layer.mlp
        mlp.gate_up = stacked([mlp.gate_proj, mlp.up_proj])
        mlp.width = mlp.gate_proj.weight.shape[0]

    def fused_call(self, x):
        gate, up = mx.split(self.gate_up(x), [self.width], axis=-1)
        return self.down_proj(self.activation(gate) * up)

    decoder.MLP.__call__ = fused_call


def fuse_attention(model):
    for layer in model.language_model.model.layers:
        attention = layer.self_attn
        parts = [attention.q_proj, attention.k_proj] + ([] if attention.keys_are_values else [attention.v_proj])
        attention.qkv = stacked(parts)
        attention.splits = list(mx.cumsum(mx.array([p.weight.shape[0] for p in parts[:-1]])).tolist())

    def fused_call(self, x, mask, cache, offset, shared_kv):
        batch, length, _ = x.shape
        pieces = mx.split(self.qkv(x), self.splits, axis=-1)
        queries = self.q_norm(pieces[0].reshape(batch, length, -1, self.head_dim))
        queries = self.rope(queries.transpose(0, 2, 1, 3), offset)
        raw_keys = pieces[1].reshape(batch, length, -1, self.head_dim)
        raw_values = raw_keys if self.keys_are_values else pieces[2].reshape(batch, length, -1, self.head_dim)
        keys = self.rope(self.k_norm(raw_keys).transpose(0, 2, 1, 3), offset)
        values = decoder.rms_norm_without_scale(raw_values, self.eps).transpose(0, 2, 1, 3)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        output = mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=1.0, mask=decoder.resolve(mask, keys.shape[2]))
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(batch, length, -1))

    decoder.Attention.__call__ = fused_call


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
    measure("ours", model)
    fuse_mlp(model)
    measure("ours + fused gate/up", model)
    fuse_attention(model)
    measure("ours + fused gate/up + fused qkv", model)
    compile_residuals(model)
    measure("ours + fused projections + compiled residuals", model)
    print("| runtime | ms per step, synchronous | ms per step, pipelined | tok/s pipelined | max logit difference |")
    print("|---|---|---|---|---|")
    for name, sync, pipelined, difference in rows:
        print(f"| {name} | {sync:.2f} | {pipelined:.2f} | {1000 / pipelined:.1f} | {difference:.3g} |")


if __name__ == "__main__":
    main()
