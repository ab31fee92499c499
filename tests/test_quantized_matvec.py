"""The few-row quantized product: which products take the CUDA kernel (CPU tests), and what the kernel computes
(tests marked `gpu`, run on a CUDA machine: they skip where CUDA is absent)."""

import itertools

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_gemma4 import quantized_matvec
from mlx_gemma4.quantized_layers import QuantizedEmbedding, QuantizedLinear, use_few_row_products
from mlx_gemma4.decoder import MLP, gelu_tanh_gate
from mlx_gemma4.quantized_matvec import (GATE_SWITCH, MAX_ROWS, SWITCH, few_row_matmul, gates_in_kernel,
                                         reference_quantized_matmul, uses_kernel)

CUDA = mx.cuda.is_available()


def quantized(output_rows: int, input_dims: int, bits: int, group_size: int, scale_dtype=mx.bfloat16, seed=0):
    mx.random.seed(seed)
    w, scales, biases = mx.quantize(mx.random.normal((output_rows, input_dims)) * 0.05, group_size, bits)
    return w, scales.astype(scale_dtype), biases.astype(scale_dtype)


def rows_of_x(count: int, input_dims: int, dtype=mx.bfloat16, seed=1):
    return mx.random.normal((count, input_dims), key=mx.random.key(seed)).astype(dtype)


@pytest.fixture
def on_cuda(monkeypatch):
    """The rule as it runs on a CUDA machine, with the kernel replaced by MLX's product and its calls counted."""
    calls = []

    def counted(x, w, scales, biases, group_size, bits, gated=False):
        calls.append((x.shape, gated))
        out = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
        if gated:  # gated as the MLP gates (the kernel's own gating is the GPU tests' to check)
            return gelu_tanh_gate(*mx.split(out, 2, axis=-1))
        return out

    monkeypatch.setattr(quantized_matvec, "cuda_backend", lambda: True)
    monkeypatch.setattr(quantized_matvec, "few_row_matmul", counted)
    monkeypatch.setenv(SWITCH, "1")
    return calls


def test_rule_takes_up_to_sixteen_rows_of_affine_4_and_8_bit_products(on_cuda):
    for bits, group_size in itertools.product((4, 8), (32, 64, 128)):
        w, scales, biases = quantized(32, 256, bits, group_size)
        assert uses_kernel(rows_of_x(MAX_ROWS, 256), w, scales, biases, group_size, bits, "affine")
        assert not uses_kernel(rows_of_x(MAX_ROWS + 1, 256), w, scales, biases, group_size, bits, "affine")


def test_rule_leaves_other_formats_and_float32_activations_to_mlx(on_cuda):
    w, scales, biases = quantized(32, 256, 3, 64)
    assert not uses_kernel(rows_of_x(1, 256), w, scales, biases, 64, 3, "affine")
    w, scales, biases = quantized(32, 256, 4, 64)
    assert not uses_kernel(rows_of_x(1, 256, mx.float32), w, scales, biases, 64, 4, "affine")
    assert not uses_kernel(rows_of_x(1, 256), w, scales, None, 64, 4, "affine")
    w, scales = mx.quantize(mx.random.normal((32, 256)), 32, 4, mode="mxfp4")
    assert not uses_kernel(rows_of_x(1, 256), w, scales, None, 32, 4, "mxfp4")


def test_the_kernel_is_on_unless_switched_off(on_cuda, monkeypatch):
    w, scales, biases = quantized(32, 256, 4, 64)
    monkeypatch.delenv(SWITCH)
    assert uses_kernel(rows_of_x(1, 256), w, scales, biases, 64, 4, "affine")
    monkeypatch.setenv(SWITCH, "0")
    assert not uses_kernel(rows_of_x(1, 256), w, scales, biases, 64, 4, "affine")


def test_cpu_backend_never_takes_the_kernel(monkeypatch):
    monkeypatch.setenv(SWITCH, "1")
    w, scales, biases = quantized(32, 256, 4, 64)
    with mx.stream(mx.cpu):
        assert not uses_kernel(rows_of_x(1, 256), w, scales, biases, 64, 4, "affine")


def test_every_quantized_linear_layer_and_the_tied_head_take_the_kernel_for_a_decode_step(on_cuda):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from random_model import build_random_model

    model, _ = build_random_model("tiny", 4)
    layers = [m for _, m in model.language_model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(type(m) is QuantizedLinear for m in layers)
    assert type(model.language_model.model.embed_tokens) is QuantizedEmbedding
    mx.eval(model(mx.array([[5]])))
    assert len(on_cuda) == len(layers) + 1  # every layer once, plus the tied head
    assert all(shape[0] == 1 for shape, _ in on_cuda)
    # Each MLP's stacked gate and up projection is gated in its kernel.
    mlps = [m for _, m in model.language_model.named_modules() if isinstance(m, MLP)]
    assert sum(gated for _, gated in on_cuda) == len(mlps) > 0


def test_four_bit_groups_of_128_with_two_tiles_a_warp_take_at_most_8_warps_a_block_at_any_rows():
    """Their lanes load four words of codes a chunk: 16 warps of them would ask for more registers than a block
    has. The cap follows the format and shape, never the rows of x (each row keeps its order of sums)."""
    from mlx_gemma4.quantized_matvec import launch_plan

    for rows in (1, 8, 9, 16):
        assert launch_plan(8192, 3840, 4, 128, rows)["KSPLIT"] == 8  # the 12B's stacked q/k/v: two tiles a warp
        assert launch_plan(8192, 3840, 4, 64, rows)["KSPLIT"] == 16
        assert launch_plan(8192, 3840, 8, 128, rows)["KSPLIT"] == 16
        assert launch_plan(3840, 15360, 4, 128, rows)["KSPLIT"] == 16  # down: one tile a warp


def test_the_gated_product_has_its_own_switch_and_needs_halves_of_whole_tiles(on_cuda, monkeypatch):
    w, scales, biases = quantized(64, 256, 4, 64)
    assert gates_in_kernel(rows_of_x(3, 256), w, scales, biases, 64, 4, "affine")
    monkeypatch.setenv(GATE_SWITCH, "0")
    assert not gates_in_kernel(rows_of_x(3, 256), w, scales, biases, 64, 4, "affine")
    assert uses_kernel(rows_of_x(3, 256), w, scales, biases, 64, 4, "affine")
    monkeypatch.setenv(GATE_SWITCH, "1")
    w, scales, biases = quantized(48, 256, 4, 64)  # halves of 24 rows: a block would straddle gate and up
    assert not gates_in_kernel(rows_of_x(3, 256), w, scales, biases, 64, 4, "affine")
    assert uses_kernel(rows_of_x(3, 256), w, scales, biases, 64, 4, "affine")


def test_a_step_gated_in_the_product_computes_what_the_plain_mlp_does(on_cuda, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from random_model import build_random_model

    model, _ = build_random_model("tiny", 4)
    gated = model(mx.array([[5]]))
    monkeypatch.setenv(GATE_SWITCH, "0")
    plain = model(mx.array([[5]]))
    assert any(g for _, g in on_cuda) and not all(g for _, g in on_cuda)
    assert mx.array_equal(gated, plain)


def test_without_the_kernel_the_mlp_gates_exactly_as_before():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from random_model import build_random_model

    model, _ = build_random_model("tiny", 4)
    mlp = model.language_model.model.layers[0].mlp
    x = rows_of_x(3, model.config.text_config.hidden_size)[None]
    gate, up = mx.split(mlp.gate_up(x), [mlp.gate_rows], axis=-1)
    assert mx.array_equal(mlp(x), mlp.down_proj(mlp.gated(gate, up)))


def test_swapped_layers_compute_what_mlx_layers_compute_on_the_cpu():
    mx.random.seed(0)
    plain = nn.QuantizedLinear(256, 48, bias=True, group_size=64, bits=4)
    embedding = nn.QuantizedEmbedding(48, 256, group_size=64, bits=4)
    holder = nn.Module()
    holder.linear, holder.embedding = plain, embedding
    use_few_row_products(holder)
    x = rows_of_x(3, 256)
    assert type(holder.linear) is QuantizedLinear and holder.linear.weight is plain.weight
    assert mx.array_equal(holder.linear(x), plain(x))
    assert mx.array_equal(holder.embedding.as_linear(x), embedding.as_linear(x))


gpu = pytest.mark.gpu
FORMATS = [(bits, group) for bits in (4, 8) for group in (32, 64, 128)]
# A shape the tiles divide, and one they do not (rows not a multiple of 16).
DIVISIBLE, ODD = (256, 768), (77, 384)
CASES = ([(DIVISIBLE, mx.bfloat16, mx.bfloat16)]
         + [(ODD, x_dtype, scale_dtype) for x_dtype, scale_dtype in
            [(mx.bfloat16, mx.bfloat16), (mx.float16, mx.float16), (mx.bfloat16, mx.float32)]])


def relative_error(out, ref) -> float:
    out, ref = out.astype(mx.float32), ref.astype(mx.float32)
    return (mx.linalg.norm(out - ref) / mx.linalg.norm(ref)).item()


@gpu
@pytest.mark.parametrize("bits,group_size", FORMATS)
@pytest.mark.parametrize("shape,x_dtype,scale_dtype", CASES)
def test_kernel_matches_dequantized_product_and_mlx(bits, group_size, shape, x_dtype, scale_dtype):
    w, scales, biases = quantized(*shape, bits, group_size, scale_dtype)
    for rows in (1, 3, 9, 16):
        x = rows_of_x(rows, shape[1], x_dtype, seed=rows)
        out = few_row_matmul(x, w, scales, biases, group_size, bits)
        with mx.stream(mx.cpu):  # float32 on the CPU: no reduced-precision GEMM in the reference
            reference = reference_quantized_matmul(x, w, scales, biases, group_size, bits)
        assert out.dtype == reference.dtype and out.shape == reference.shape
        # Both round the same float32 sum to the output dtype: measured 0 to 2e-6 on an H200.
        assert relative_error(out, reference) < 2e-3
        if rows <= 3:  # MLX's own kernel, whose rounding differs (measured up to 3.3e-3 on an H200)
            mlx = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
            assert out.dtype == mlx.dtype and relative_error(out, mlx) < 1e-2


@gpu
@pytest.mark.parametrize("bits,group_size", FORMATS)
@pytest.mark.parametrize("output_rows,input_dims", [ODD, (1000, 3840)])  # 2nd: K split unevenly among warps
def test_each_row_is_bit_for_bit_its_one_row_product(bits, group_size, output_rows, input_dims):
    w, scales, biases = quantized(output_rows, input_dims, bits, group_size)
    x = rows_of_x(MAX_ROWS, input_dims)
    alone = [few_row_matmul(x[i:i + 1], w, scales, biases, group_size, bits) for i in range(MAX_ROWS)]
    for rows in (2, 5, 8, 9, 16):
        together = few_row_matmul(x[:rows], w, scales, biases, group_size, bits)
        for i in range(rows):
            assert mx.array_equal(together[i:i + 1], alone[i]), (rows, i)


def reference_gated(x, w, scales, biases, group_size, bits):
    """gelu_tanh(gate) * up in float32 on the CPU, from [gate | up] rounded to the output dtype as the kernel rounds
    them."""
    with mx.stream(mx.cpu):
        product = reference_quantized_matmul(x, w, scales, biases, group_size, bits)
        gate, up = mx.split(product.astype(mx.float32), 2, axis=-1)
        return (nn.gelu_approx(gate) * up).astype(product.dtype)


GATED_CASES = ([((256, 768), mx.bfloat16, mx.bfloat16)]
               + [((96, 384), x_dtype, scale_dtype) for x_dtype, scale_dtype in
                  [(mx.bfloat16, mx.bfloat16), (mx.float16, mx.float16), (mx.bfloat16, mx.float32)]])


@gpu
@pytest.mark.parametrize("bits,group_size", FORMATS)
@pytest.mark.parametrize("shape,x_dtype,scale_dtype", GATED_CASES)
def test_gated_kernel_matches_the_gated_dequantized_product(bits, group_size, shape, x_dtype, scale_dtype):
    w, scales, biases = quantized(*shape, bits, group_size, scale_dtype)
    for rows in (1, 3, 16):
        x = rows_of_x(rows, shape[1], x_dtype, seed=rows)
        out = few_row_matmul(x, w, scales, biases, group_size, bits, gated=True)
        reference = reference_gated(x, w, scales, biases, group_size, bits)
        assert out.dtype == reference.dtype and out.shape == reference.shape == (rows, shape[0] // 2)
        assert relative_error(out, reference) < 2e-3
        # The same kernel's [gate | up], gated afterwards in float32 on the GPU: only tanh's last bits may differ.
        plain = few_row_matmul(x, w, scales, biases, group_size, bits)
        gate, up = mx.split(plain.astype(mx.float32), 2, axis=-1)
        assert relative_error(out, (nn.gelu_approx(gate) * up).astype(plain.dtype)) < 1e-3


@gpu
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_gated_rows_are_bit_for_bit_their_one_row_products(bits, group_size):
    w, scales, biases = quantized(2048, 3840, bits, group_size)
    x = rows_of_x(MAX_ROWS, 3840)
    alone = [few_row_matmul(x[i:i + 1], w, scales, biases, group_size, bits, gated=True) for i in range(MAX_ROWS)]
    for rows in (4, 9, 16):
        together = few_row_matmul(x[:rows], w, scales, biases, group_size, bits, gated=True)
        for i in range(rows):
            assert mx.array_equal(together[i:i + 1], alone[i]), (rows, i)


@gpu
def test_leading_dimensions_of_x_are_its_rows(bits=4, group_size=64):
    w, scales, biases = quantized(256, 768, bits, group_size)
    x = rows_of_x(6, 768)
    flat = few_row_matmul(x, w, scales, biases, group_size, bits)
    shaped = few_row_matmul(x.reshape(1, 2, 3, 768), w, scales, biases, group_size, bits)
    assert shaped.shape == (1, 2, 3, 256) and mx.array_equal(shaped.reshape(6, 256), flat)
    one = few_row_matmul(x[0], w, scales, biases, group_size, bits)
    assert one.shape == (256,) and mx.array_equal(one, flat[0])


@gpu
def test_kernel_runs_inside_a_compiled_function(monkeypatch):
    monkeypatch.setenv(SWITCH, "1")
    w, scales, biases = quantized(512, 1024, 4, 64)
    layer = nn.QuantizedLinear(1024, 512, bias=False, group_size=64, bits=4)
    layer.update({"weight": w, "scales": scales, "biases": biases})
    holder = nn.Module()
    holder.layer = layer
    use_few_row_products(holder)
    x = rows_of_x(4, 1024)
    compiled = mx.compile(lambda v: holder.layer(v) * 2)
    assert mx.array_equal(compiled(x), holder.layer(x) * 2)
