"""How our CUDA kernels' text reaches MLX: through files named by their contents, so that MLX hashes a short text
at every launch (CPU tests, MLX's kernel maker stood in), and the same kernels compile and compute alike either
way (a `gpu` test)."""

import mlx.core as mx
import pytest

from mlx_gemma4 import cuda_source
from mlx_gemma4.cuda_source import SWITCH, CudaKernel, included, shape_markers

gpu = pytest.mark.gpu


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def made(monkeypatch):
    """mx.fast.cuda_kernel stood in: the keyword arguments of each kernel it makes."""
    calls = []

    def maker(**arguments):
        calls.append(arguments)
        return lambda **launch: ("launched", len(calls))

    monkeypatch.setattr(mx.fast, "cuda_kernel", maker)
    return calls


def test_a_text_goes_to_a_file_named_by_its_contents_and_an_include_line_names_it(cache_home):
    line = included("int x = 1;")
    path = line.removeprefix('#include "').removesuffix('"\n')
    assert line == f'#include "{path}"\n' and path.startswith(str(cache_home / "mlx_gemma4" / "cuda_sources"))
    with open(path) as written:
        assert written.read() == "int x = 1;"
    assert included("int x = 1;") == line and included("int x = 2;") != line


def test_a_file_changed_since_is_written_again(cache_home):
    line = included("int x = 1;")
    path = line.removeprefix('#include "').removesuffix('"\n')
    with open(path, "w") as damaged:
        damaged.write("int x = 3;")
    assert included("int x = 1;") == line
    with open(path) as written:
        assert written.read() == "int x = 1;"


def test_where_no_file_can_be_written_the_text_goes_as_it_is(tmp_path, monkeypatch):
    blocked = tmp_path / "a file, not a directory"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert included("int x = 1;") == "int x = 1;"


def test_the_short_text_still_names_the_shapes_the_kernel_reads():
    source = "int m = x_shape[0] * x_ndim; int s = y_strides[1];"
    assert shape_markers(source, ["x", "y", "z"]) == "\n// x_shape x_ndim y_strides"
    assert shape_markers("int m = 1;", ["x"]) == ""


def test_a_kernel_is_made_from_include_lines_unless_switched_off(cache_home, made, monkeypatch):
    kernel = CudaKernel(name="k", input_names=["x"], output_names=["out"], header="// why\n#define H 1  \n",
                        source="  out[0] = x_shape[0];  // first\n", shared_memory=64)
    monkeypatch.setenv(SWITCH, "1")
    assert kernel(inputs=[]) == ("launched", 1) and kernel(inputs=[]) == ("launched", 1)  # made once
    through_files = made[0]
    assert through_files["source"].startswith('#include "') and through_files["source"].endswith("// x_shape")
    assert through_files["header"].startswith('#include "') and through_files["shared_memory"] == 64
    with open(through_files["header"].split('"')[1]) as header:
        assert header.read() == "#define H 1\n"  # its line ended: MLX's text comes right after
    monkeypatch.setenv(SWITCH, "0")
    assert kernel(inputs=[]) == ("launched", 2)
    assert made[1]["source"] == "out[0] = x_shape[0];\n" and made[1]["header"] == "#define H 1\n"


def test_every_kernel_module_makes_its_kernels_through_cuda_kernel():
    from mlx_gemma4 import cache_writes, decode_attention, fused_norms, quantized_matvec

    kernels = [quantized_matvec.few_row_kernel(1024), fused_norms.kernel("residual_then_norm", 1e-6),
               decode_attention.span_kernel(True, True), decode_attention.merge_kernel(), cache_writes.write_kernel(2)]
    assert all(isinstance(kernel, CudaKernel) for kernel in kernels)


@gpu
def test_a_kernel_through_files_computes_what_it_does_from_its_whole_text(cache_home, monkeypatch):
    from mlx_gemma4.fused_norms import residual_then_norm

    x, addend = (mx.random.normal((3, 1, 3840), key=mx.random.key(seed)).astype(mx.bfloat16) for seed in (1, 2))
    weights = [mx.random.normal((3840,), key=mx.random.key(seed)).astype(mx.bfloat16) for seed in (3, 4)]
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(SWITCH, switch)
        results[switch] = residual_then_norm(x, addend, *weights, 1e-6)
        mx.eval(results[switch])
    assert all(mx.array_equal(a, b) for a, b in zip(results["1"], results["0"]))
    assert any(cuda_source.source_directory().iterdir())
