"""The benchmark runs end to end on the tiny random shape and writes valid JSON; peers read the same weights.
Benchmarks are not tests: nothing here asserts a speed."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench  # noqa: E402
from random_model import build_random_model, save_converted  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "results.json"
    bench.main(["--random", "tiny", "--bits", "32", "--prompt-tokens", "40", "--gen-tokens", "6", "--repeat", "1",
                "--peers", "mlx-lm,mlx-vlm-lm", "--image", "9", "--audio", "0.2", "--random-draft",
                "--num-draft-tokens", "2", "--cost-model", "--long-context", "70", "--json", str(path)])
    return json.loads(path.read_text())


def test_bench_writes_every_section_as_json(results):
    runtimes = {row["runtime"] for row in results["generation"]}
    assert runtimes == {"ours", "mlx-lm", "mlx-vlm-lm"}
    assert all(row["decode_tps"] > 0 and row["generated_tokens"] == 6 for row in results["generation"])
    assert results["multimodal"][0]["prefill_tps"] > 0
    assert results["mtp"][0]["tokens_per_target_pass"] >= 1
    assert len(results["cost_model"]["relative_target_cost"]) == 9
    assert {row["runtime"] for row in results["long_context"]} == {"ours", "mlx-lm"}


def test_random_model_weights_load_unchanged_in_every_runtime(tmp_path):
    from mlx_lm.utils import load_model

    from mlx_gemma4.loading import load_model as load_ours

    model, config = build_random_model("tiny", 32, seed=5)
    save_converted(model, config, tmp_path)
    ids = mx.arange(3, 43)[None]  # longer than the tiny shape's sliding window
    expected = model(ids)
    peer, _ = load_model(tmp_path)
    assert mx.abs(load_ours(tmp_path)(ids) - expected).max().item() < 1e-5
    assert mx.abs(peer(ids) - expected).max().item() < 1e-4


def test_quantized_random_model_is_built_quantized():
    model, config = build_random_model("tiny", 4)
    layer = model.language_model.model.layers[0]
    assert config["quantization"]["bits"] == 4
    assert layer.mlp.gate_proj.weight.dtype == mx.uint32
    assert model.language_model.model.embed_tokens.weight.dtype == mx.uint32
    # float32 scales anywhere would turn the residual stream float32, as no converted checkpoint does
    from mlx.utils import tree_flatten

    float_dtypes = {value.dtype for _, value in tree_flatten(model.language_model.parameters())} - {mx.uint32}
    assert float_dtypes == {mx.bfloat16}
    assert model(mx.array([[5, 6, 7]])).dtype == mx.bfloat16
