"""The benchmark runs end to end on the tiny random shape and writes valid JSON; peers read the same weights (the
assistant too, for mlx-vlm's MTP). Benchmarks are not tests: nothing here asserts a speed."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench  # noqa: E402
from random_model import build_random_model, save_converted  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "results.json"
    bench.main(["--random", "tiny", "--bits", "32", "--prompt-tokens", "40", "--gen-tokens", "6", "--repeat", "1",
                "--peers", "mlx-lm,mlx-vlm,mlx-vlm-lm", "--image", "9", "--audio", "0.2", "--random-draft",
                "--num-draft-tokens", "2", "--cost-model", "--long-context", "70", "--long-context-kv-bits", "none,8",
                "--json", str(path)])
    return json.loads(path.read_text())


def test_bench_writes_every_section_as_json(results):
    runtimes = {row["runtime"] for row in results["generation"]}
    assert runtimes == {"ours", "mlx-lm", "mlx-vlm", "mlx-vlm-lm"}
    assert all(row["decode_tps"] > 0 and row["generated_tokens"] == 6 for row in results["generation"])
    assert results["multimodal"][0]["prefill_tps"] > 0
    assert results["mtp"][0]["tokens_per_target_pass"] >= 1
    assert len(results["cost_model"]["relative_target_cost"]) == 9
    assert {row["runtime"] for row in results["long_context"]} == {"ours", "mlx-lm", "mlx-vlm"}


def test_mlx_vlm_mtp_runs_on_our_assistant_and_agrees_with_our_greedy_tokens(results):
    rows = {row["runtime"]: row for row in results["mtp"]}
    assert set(rows) == {"ours + MTP (K=2)", "mlx-vlm + MTP (K=2)"}
    peer = rows["mlx-vlm + MTP (K=2)"]
    plain = next(row for row in results["generation"] if row["runtime"] == "mlx-vlm")
    assert peer["tokens_agreeing_with_ours"] == peer["generated_tokens"] == 6
    assert peer["num_draft_tokens"] == rows["ours + MTP (K=2)"]["num_draft_tokens"] == 2
    assert peer["plain_decode_tps"] == plain["decode_tps"]
    assert peer["tokens_per_target_pass"] >= 1 and 0 < peer["draft_tokens_per_pass"] <= 2


def test_long_context_rows_split_the_peak_into_weights_kv_cache_and_transient(results):
    ran = [row for row in results["long_context"] if "skipped" not in row]
    assert {row["kv_bits"] for row in ran} == {None}
    for row in ran:
        held = row["weights_bytes"] + row["kv_cache_bytes"]
        assert row["transient_bytes"] == row["peak_memory_bytes"] - held
        assert row["weights_bytes"] > 0 and row["kv_cache_bytes"] > 0
        # The peak is the prompt's or decoding's, whichever is higher; each is reported.
        split = [row["transient_until_first_token_bytes"], row["transient_after_first_token_bytes"]]
        assert max(split) == row["transient_bytes"] and min(split) + held > 0
    # The tiny shape's heads (16) cannot be quantized in groups of 64, and mlx-lm cannot quantize a rotating
    # cache at all: both are recorded as failures, not crashes.
    failed = {row["runtime"]: row["skipped"] for row in results["long_context"] if row["kv_bits"] == 8}
    assert "cannot be quantized in groups of 64" in failed["ours"]
    assert "Quantization NYI" in failed["mlx-lm"]


def test_missing_mlx_lm_mtp_is_noted_once(results):
    assert sum(note.startswith("mlx-lm: no MTP") for note in results["notes"]) == 1


def test_report_sets_our_mtp_against_mlx_vlm_at_the_same_k(results):
    from report import markdown

    ours_row = next(line for line in markdown(results).splitlines() if line.startswith("| prompt 40 | ours + MTP"))
    ratio = results["mtp"][0]["decode_tps"] / results["mtp"][1]["decode_tps"]
    assert f"| {ratio:.2f}x |" in ours_row


def test_random_assistant_loads_unchanged_in_mlx_vlm(tmp_path):
    from mlx_vlm.speculative.drafters import load_drafter

    from mlx_gemma4.speculative import store_caches
    from peer_mtp import save_peer_assistant
    from random_model import assistant_config_dict, build_random_assistant

    model, config = build_random_model("tiny", 32, seed=5)
    drafter = build_random_assistant(config, 32, seed=6)
    save_peer_assistant(drafter, assistant_config_dict(config), tmp_path)
    peer, _ = load_drafter(str(tmp_path), kind="mtp")
    # Within the sliding window: past it, mlx-vlm's drafter masks the sliding keys its own way.
    position = config["text_config"]["sliding_window"] - 12
    cache = model.make_cache()
    _, hidden = model(mx.arange(3, 3 + position)[None], cache=cache, return_hidden=True)
    target_kv = {kind: layer_cache.keys_and_values() for kind, layer_cache in store_caches(model, cache).items()}
    embedding = model.language_model.model.embed(mx.array([[7]]))
    expected_logits, expected_state = drafter(embedding, hidden[:, -1:], target_kv, position)
    peer.set_shared_kv(target_kv, position, position=position, kv_valid_len=position)
    state, logits = peer(mx.concatenate([embedding, hidden[:, -1:]], axis=-1), target_kv, mx.array([[position]]))
    assert mx.abs(logits - expected_logits).max().item() < 1e-4
    assert mx.abs(state - expected_state).max().item() < 1e-4


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
    assert layer.mlp.gate_up.weight.dtype == mx.uint32
    assert model.language_model.model.embed_tokens.weight.dtype == mx.uint32
    # float32 scales anywhere would turn the residual stream float32, as no converted checkpoint does
    from mlx.utils import tree_flatten

    float_dtypes = {value.dtype for _, value in tree_flatten(model.language_model.parameters())} - {mx.uint32}
    assert float_dtypes == {mx.bfloat16}
    assert model(mx.array([[5, 6, 7]])).dtype == mx.bfloat16


def test_default_four_bit_random_pair_runs_with_layers_narrower_than_a_group_left_unquantized(tmp_path):
    from random_model import GROUP_SIZE, build_random_assistant

    model, config = build_random_model("tiny", 4)
    drafter = build_random_assistant(config, 4)
    assert drafter.model.embed_tokens.weight.shape[-1] % GROUP_SIZE  # the tiny assistant is 32 wide
    assert drafter.model.embed_tokens.weight.dtype == mx.bfloat16
    path = tmp_path / "results.json"
    bench.main(["--random", "tiny", "--random-draft", "--prompt-tokens", "20", "--gen-tokens", "4", "--repeat", "1",
                "--num-draft-tokens", "2", "--json", str(path)])
    assert json.loads(path.read_text())["mtp"][0]["generated_tokens"] == 4


def test_controlled_acceptance_runs_with_adaptive_and_fixed_draft_lengths(tmp_path):
    path = tmp_path / "results.json"
    bench.main(["--random", "tiny", "--bits", "32", "--random-draft", "--prompt-tokens", "20", "--gen-tokens", "12",
                "--repeat", "1", "--num-draft-tokens", "adaptive,2", "--controlled-acceptance", "1.0",
                "--json", str(path)])
    controlled = [row for row in json.loads(path.read_text())["mtp"] if row.get("controlled_acceptance") == 1.0]
    assert {row["num_draft_tokens"] for row in controlled} == {"adaptive", 2}
    for row in controlled:  # every draft is the target's own greedy token: all kept, and the output is plain greedy
        assert row["tokens_agreeing_with_ours"] == row["generated_tokens"] == 12
    fixed = next(row for row in controlled if row["num_draft_tokens"] == 2)
    assert fixed["tokens_per_target_pass"] > 2
    # Its rounds are timed by draft length: K = 2 throughout, shorter where a generation ends.
    rounds = fixed["round_ms_by_draft_tokens"]
    assert set(rounds) <= {"0", "1", "2"} and rounds["2"]["rounds"] >= 2
    assert all(entry["median_ms"] > 0 for entry in rounds.values())


def test_mtp_rows_run_every_verify_pass_length_before_they_are_timed():
    from mtp import speculative_runtime

    from mlx_gemma4.draft_policy import MAX_DRAFT_TOKENS

    model, _ = build_random_model("tiny", 32, seed=2)
    speculative_runtime(model, None, 2).warm_up(list(range(10, 50)))
    # A fixed K of 2 passes 3 tokens, and 2 or 1 where a generation ends.
    assert {tokens for _, tokens in model.compiled_steps.functions} == {1, 2, 3}
    speculative_runtime(model, None, None).warm_up(list(range(10, 50)))
    traced_lengths = {tokens for _, tokens in model.compiled_steps.functions}
    assert traced_lengths == set(range(1, MAX_DRAFT_TOKENS + 2))


def test_quality_study_scores_dequantized_weights_that_compute_the_quantized_model():
    sys.path.insert(0, str(BENCH / "studies"))
    from quant_quality import dequantized

    quantized, _ = build_random_model("tiny", 4, seed=3)
    plain, _ = build_random_model("tiny", 4, seed=3)
    for model in (quantized, plain):  # float32 scales, as the study's float32 checkpoint gives
        model.set_dtype(mx.float32)
    dequantized(plain)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in plain.named_modules())
    ids = mx.arange(3, 40)[None]
    assert mx.abs(plain(ids) - quantized(ids)).max().item() < 1e-4


def test_results_say_which_code_made_them_and_whether_our_kernels_ran(results, monkeypatch):
    from measure import environment

    assert results["environment"]["few_row_kernel"] is False  # this CPU: MLX's own products
    assert results["environment"]["decode_attention_kernel"] is False
    monkeypatch.setattr("mlx_gemma4.cuda_backend.cuda_backend", lambda: True)
    assert environment()["few_row_kernel"] is True and environment()["decode_attention_kernel"] is True
    assert environment()["gated_product"] is True
    monkeypatch.setenv("MLX_GEMMA4_GATED_PRODUCT", "0")
    assert environment()["gated_product"] is False and environment()["few_row_kernel"] is True
    monkeypatch.delenv("MLX_GEMMA4_GATED_PRODUCT")
    monkeypatch.setenv("MLX_GEMMA4_MATVEC", "0")
    assert environment()["few_row_kernel"] is False and environment()["decode_attention_kernel"] is True
    assert environment()["gated_product"] is False  # the gating is the few-row kernel's last step
    monkeypatch.setenv("MLX_GEMMA4_DECODE_ATTENTION", "0")
    assert environment()["decode_attention_kernel"] is False and environment()["fused_norms_kernel"] is True
    monkeypatch.setenv("MLX_GEMMA4_FUSED_NORMS", "0")
    assert environment()["fused_norms_kernel"] is False and environment()["in_place_cache_writes"] is True
    monkeypatch.setenv("MLX_GEMMA4_IN_PLACE_WRITES", "0")
    assert environment()["in_place_cache_writes"] is False and environment()["kernel_source_files"] is True
    monkeypatch.setenv("MLX_GEMMA4_SOURCE_FILES", "0")
    assert environment()["kernel_source_files"] is False
    commit = results["environment"]["commit"]
    assert commit is None or len(commit.split("+")[0]) == 40


def test_kernel_table_takes_a_subset_of_layers_and_refuses_unknown_names():
    from matvec_table import SHAPES_12B

    from mlx_gemma4.errors import Gemma4Error

    args = bench.parse_args(["--kernel-table", "--table-layers", "gate+up, lm head"])
    assert bench.table_layers(args) == {"gate+up", "lm head"} <= {name for name, _, _ in SHAPES_12B}
    assert bench.table_layers(bench.parse_args(["--kernel-table"])) is None
    with pytest.raises(Gemma4Error, match="unknown --table-layers mlp; choose from q "):
        bench.main(["--kernel-table", "--table-layers", "gate+up,mlp"])
