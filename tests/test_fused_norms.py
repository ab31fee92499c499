"""The decoding step's fused norms, residual sums and rotations: which calls take the CUDA kernels (CPU tests), what
the kernels compute, and a whole model decoding with every kernel of ours on against every one off (tests marked
`gpu`, run on a CUDA machine: they skip where CUDA is absent)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import decode_attention, fused_norms, quantized_matvec
from mlx_gemma4.decoder import RMSNorm, RotaryEmbedding
from mlx_gemma4.fused_norms import (SWITCH, normalized_heads, query_key_value, residual_then_norm, scaled_residual,
                                    scaled_residual_then_norm, uses_kernels)

gpu = pytest.mark.gpu
EPS = 1e-6


def test_rule_takes_up_to_sixteen_tokens_of_16_bit_activations(monkeypatch):
    monkeypatch.setattr(fused_norms, "cuda_backend", lambda: True)
    monkeypatch.setenv(SWITCH, "1")
    assert uses_kernels(mx.zeros((1, 1, 64), mx.bfloat16))
    assert uses_kernels(mx.zeros((1, 16, 64), mx.float16))
    assert not uses_kernels(mx.zeros((1, 17, 64), mx.bfloat16))
    assert not uses_kernels(mx.zeros((1, 1, 64), mx.float32))
    monkeypatch.setenv(SWITCH, "0")
    assert not uses_kernels(mx.zeros((1, 1, 64), mx.bfloat16))


def test_without_cuda_the_functions_are_the_mlx_operations():
    mx.random.seed(0)
    x, a = (mx.random.normal((1, 3, 64)).astype(mx.bfloat16) for _ in range(2))
    w1, w2 = (mx.random.uniform(0.5, 1.5, (64,)).astype(mx.bfloat16) for _ in range(2))
    h, normed = residual_then_norm(x, a, w1, w2, EPS)
    assert mx.array_equal(h, x + mx.fast.rms_norm(a, w1, EPS))
    assert mx.array_equal(normed, mx.fast.rms_norm(h, w2, EPS))
    scalar = mx.array([0.75], mx.bfloat16)
    scaled = (x + mx.fast.rms_norm(a, w1, EPS)) * scalar
    assert mx.array_equal(scaled_residual(x, a, w1, scalar, EPS), scaled)
    out, normed = scaled_residual_then_norm(x, a, w1, scalar, w2, EPS)
    assert mx.array_equal(out, scaled) and mx.array_equal(normed, mx.fast.rms_norm(scaled, w2, EPS))


def heads_case(head_dim: int, heads: int, kv_heads: int, keys_are_values: bool, tokens: int, dtype, seed=0):
    mx.random.seed(seed)
    width = (heads + kv_heads * (1 if keys_are_values else 2)) * head_dim
    qkv = (mx.random.normal((1, tokens, width)) * 3).astype(dtype)
    q_weight, k_weight = (mx.random.uniform(0.5, 1.5, (head_dim,)).astype(dtype) for _ in range(2))
    rope = RotaryEmbedding(head_dim, {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                      "rope_theta": 1e6} if keys_are_values else {"rope_theta": 1e4})
    return qkv, q_weight, k_weight, rope


def differences(got, expected) -> float:
    return max(mx.abs(g.astype(mx.float32) - e.astype(mx.float32)).max().item() for g, e in zip(got, expected))


# The kernels round where the MLX operations round, so they differ from them only where a norm's float32 sum, taken
# in another order, moves a value across a rounding boundary: one ulp of that value. ULPS is one ulp at magnitudes
# 2-4; the checks allow four: two ulps at magnitudes 4-8, one at 8-16, above what the random values here reach.
# Not measured: the H200 runs of these tests (bench/results/h200-gpu-tests-fused.log) record passes, not differences.
ULPS = {mx.bfloat16: 2 ** -6, mx.float16: 2 ** -9}


@gpu
@pytest.mark.parametrize("head_dim,heads,kv_heads,keys_are_values", [(256, 16, 8, False), (512, 16, 1, True)])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_query_key_value_kernel_matches_the_mlx_operations(head_dim, heads, kv_heads, keys_are_values, tokens, dtype):
    qkv, q_weight, k_weight, rope = heads_case(head_dim, heads, kv_heads, keys_are_values, tokens, dtype)
    for offset in (0, 1000, mx.array([200_000])):
        got = query_key_value(qkv, heads, kv_heads, head_dim, keys_are_values, q_weight, k_weight,
                              rope.wavelengths(), offset, EPS)
        pieces = mx.split(qkv, [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1)
        raw = [p.reshape(1, tokens, -1, head_dim) for p in pieces]
        expected = normalized_heads(raw[0], raw[1], raw[1] if keys_are_values else raw[2], q_weight, k_weight,
                                    offset, EPS, rope)
        assert [g.shape for g in got] == [e.shape for e in expected]
        # Outputs of magnitude up to ~4: a few ulps there.
        assert differences(got, expected) <= 4 * ULPS[dtype]


@gpu
@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_residual_kernels_match_the_mlx_operations(tokens, dtype):
    mx.random.seed(1)
    x, a = (mx.random.normal((1, tokens, 3840)).astype(dtype) for _ in range(2))
    w1, w2 = (mx.random.uniform(0.5, 1.5, (3840,)).astype(dtype) for _ in range(2))
    scalar = mx.array([0.75], dtype)
    h, normed = residual_then_norm(x, a, w1, w2, EPS)
    plain_h = x + mx.fast.rms_norm(a, w1, EPS)
    assert differences([h, normed], [plain_h, mx.fast.rms_norm(plain_h, w2, EPS)]) <= 4 * ULPS[dtype]
    scaled = scaled_residual(x, a, w1, scalar, EPS)
    plain_scaled = (x + mx.fast.rms_norm(a, w1, EPS)) * scalar
    assert differences([scaled], [plain_scaled]) <= 4 * ULPS[dtype]
    scaled_and_normed = scaled_residual_then_norm(x, a, w1, scalar, w2, EPS)
    assert differences(scaled_and_normed, [plain_scaled, mx.fast.rms_norm(plain_scaled, w2, EPS)]) <= 4 * ULPS[dtype]


SWITCHES = [SWITCH, decode_attention.SWITCH, quantized_matvec.SWITCH]


def decoded_logits(model, prompt: mx.array, following: list, on: bool, monkeypatch) -> np.ndarray:
    """Logits of each step of the compiled decoding step fed `following` tokens after `prompt`."""
    from mlx_gemma4.decode_step import decode_step

    for switch in SWITCHES:
        monkeypatch.setenv(switch, "1" if on else "0")
    model.compiled_steps.forget()  # a trace keeps the path it was made with
    cache = model.make_cache()
    mx.eval(model(prompt[None], cache=cache))
    step = decode_step(model, cache)
    rows = [step(mx.array([[token]]))[:, -1].astype(mx.float32) for token in following]
    return np.array(mx.concatenate(rows))


@gpu
def test_a_model_decodes_as_close_to_float32_with_our_kernels_as_without(monkeypatch):
    """A small bfloat16 model with the 12B's head sizes (256 sliding, 512 full, keys = values) and 4-bit weights
    decodes the same tokens through the compiled step with every kernel of ours and with none; the same model in
    float32 (MLX's operations) is the reference. Random weights amplify every rounding difference layer by layer,
    so the two bfloat16 runs are compared by their distance to the reference, not to each other."""
    from gpu_fixtures import gpu_test_model

    model, _ = gpu_test_model()
    prompt = mx.arange(100) % 4000 + 10
    following = [(7 * i) % 4000 + 10 for i in range(40)]  # past the 64-key window's wrap
    on = decoded_logits(model, prompt, following, True, monkeypatch)
    off = decoded_logits(model, prompt, following, False, monkeypatch)
    model.set_dtype(mx.float32)
    reference = decoded_logits(model, prompt, following, False, monkeypatch)
    error_on, error_off = np.abs(on - reference).mean(), np.abs(off - reference).mean()
    agreement = [(run.argmax(-1) == reference.argmax(-1)).mean() for run in (on, off)]
    print(f"mean logit error against float32: kernels on {error_on:.4f}, off {error_off:.4f}; top-1 agreement "
          f"on {agreement[0]:.3f}, off {agreement[1]:.3f}")
    # On an H200: 0.3954 on, 0.3921 off, top-1 agreement 1.000 both (bench/results/h200-gpu-tests-fused.log).
    assert error_on <= 1.5 * error_off


def emulated_kernel(name: str, eps: float):
    """What each kernel hands back, in MLX operations, read from the same launch arguments: on the CPU it checks how
    decoder.py calls the kernels (inputs, template ints, output shapes) without the kernels themselves."""

    def launch(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        ints = dict(template)
        if name == "qkv_heads":
            qkv, q_weight, k_weight, wavelengths, offset = inputs
            head_dim, heads, kv_heads = ints["D"], ints["H"], ints["KVH"]
            pieces = mx.split(qkv[None], [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1)
            raw = [piece.reshape(1, qkv.shape[0], -1, head_dim) for piece in pieces]

            def rope(x, position):
                return mx.fast.rope(x, head_dim, traditional=False, base=None, scale=1.0, offset=position,
                                    freqs=wavelengths)

            out = normalized_heads(raw[0], raw[1], raw[1] if ints["KEYS_ARE_VALUES"] else raw[2], q_weight,
                                   k_weight, offset[0], eps, rope)
        elif name == "residual_then_norm":
            x, addend, addend_weight, norm_weight = inputs
            h = x + mx.fast.rms_norm(addend, addend_weight, eps)
            out = [h, mx.fast.rms_norm(h, norm_weight, eps)]
        elif name == "scaled_residual":
            x, addend, addend_weight, scalar = inputs
            out = [(x + mx.fast.rms_norm(addend, addend_weight, eps)) * scalar]
        else:
            x, addend, addend_weight, scalar, norm_weight = inputs
            scaled = (x + mx.fast.rms_norm(addend, addend_weight, eps)) * scalar
            out = [scaled, mx.fast.rms_norm(scaled, norm_weight, eps)]
        assert [tuple(o.shape) for o in out] == [tuple(shape) for shape in output_shapes], name
        assert [o.dtype for o in out] == list(output_dtypes), name
        return list(out)

    return launch


def test_kernel_launches_agree_with_their_fallbacks(monkeypatch):
    """The Python side of each kernel's launch (inputs in order, template ints, output shapes) against the MLX
    operations the same function runs without CUDA: a bfloat16 model with head sizes the qkv kernel takes (64
    sliding, 128 full, keys = values) decodes through the compiled step with the rule on and each kernel emulated
    from its launch arguments, and gives the logits it gives with the rule off."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from random_model import SHAPES, build_random_model

    monkeypatch.setitem(SHAPES, "wiring-test", dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
        head_dim=64, global_head_dim=128, vocab_size=512, sliding_window=16))
    model, _ = build_random_model("wiring-test", 16, seed=5)
    for _, module in model.named_modules():  # distinct norm weights, so that a swapped pair shows
        if isinstance(module, RMSNorm):
            module.weight = mx.random.uniform(0.5, 1.5, module.weight.shape).astype(module.weight.dtype)
    model.language_model.model.layers[0].layer_scalar = mx.array([0.5], mx.bfloat16)
    prompt = mx.arange(30) % 500 + 10
    following = [(11 * i) % 500 + 10 for i in range(20)]
    plain = decoded_logits(model, prompt, following, False, monkeypatch)
    calls = []
    monkeypatch.setattr(fused_norms, "cuda_backend", lambda: True)
    monkeypatch.setattr(fused_norms, "kernel", lambda name, eps: calls.append(name) or emulated_kernel(name, eps))
    emulated = decoded_logits(model, prompt, following, True, monkeypatch)
    assert set(calls) == {"qkv_heads", "residual_then_norm", "scaled_residual_then_norm"}
    assert np.abs(emulated - plain).max() < 1e-6
