"""convert/: a tiny multi-shard reference checkpoint to MLX folders that mlx-gemma4, mlx-vlm and mlx-lm all load."""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from convert_fixtures import save_assistant_checkpoint, save_quantizable_checkpoint
from reference_models import reference_logits

from convert import qat
from convert.checkpoint import read_checkpoint
from convert.layout import make_layout
from convert.convert import main
from convert.pipeline import convert
from convert.quantize import QuantizationSettings, plan_quantization
from mlx_gemma4.drafter import load_drafter
from mlx_gemma4.loading import load, load_model

# Six tokens: within the fixture's sliding window, where mlx-vlm's sliding mask agrees with the reference's.
PROMPT = np.array([[2, 30, 41, 52, 100, 7]])
# Same architecture, same weights, different kernels and op order: float32 round-off only (5.2e-6 measured at most).
PEER_TOLERANCE = 2e-5
# 8-bit affine, group 64, on this random 7-layer model (which amplifies weight noise: 4-bit moves its logits by 0.46
# of their standard deviation on average): measured mean |logit diff| 0.06 and max 0.54 standard deviations; bounded
# at twice that and more.
EIGHT_BIT_MEAN_TOLERANCE = 0.15
EIGHT_BIT_MAX_TOLERANCE = 1.25


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    model = save_quantizable_checkpoint(folder)
    return folder, model


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """4, 8 and the mixed recipe -> converted folder, made once for the module."""
    root = tmp_path_factory.mktemp("mlx")
    folders = {bits: convert(str(source[0]), str(root / f"q{bits}"), q_bits=bits, progress=False) for bits in (4, 8)}
    folders["mixed"] = convert(str(source[0]), str(root / "mixed"), quant_predicate="mixed_4_8", progress=False)
    return folders


def run_cli(argv, capsys) -> tuple:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def ours_logits(folder: Path) -> np.ndarray:
    return np.array(load_model(folder)(mx.array(PROMPT)))


def mlx_vlm_logits(folder: Path) -> np.ndarray:
    """Through mlx-vlm's own `load`, processor included, as its users load a converted folder."""
    from mlx_vlm import load as mlx_vlm_load

    model, _ = mlx_vlm_load(str(folder))
    return np.array(model(mx.array(PROMPT)).logits)


def mlx_lm_logits(folder: Path) -> np.ndarray:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model, _ = mlx_lm_load_model(folder)
    return np.array(model(mx.array(PROMPT)))


def test_source_fixture_has_several_shards(source):
    index = json.loads((source[0] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2


def test_output_folder_has_shards_index_config_tokenizer_template_and_card(source, converted):
    folder = converted[4]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    stored = {name for file in set(index["weight_map"].values()) for name in mx.load(str(folder / file))}
    assert stored == set(index["weight_map"])
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (folder / name).read_bytes() == (source[0] / name).read_bytes()
    card = (folder / "README.md").read_text()
    assert "4-bit affine, group size 64" in card and "mlx_gemma4" in card


def test_every_linear_and_embedding_is_quantized_at_4_bits(converted):
    model = load_model(converted[4])
    plain = [name for name, module in model.named_modules() if type(module) in (nn.Linear, nn.Embedding)]
    assert plain == []
    assert model.language_model.model.embed_tokens.bits == 4


@pytest.mark.parametrize("bits", [4, 8, "mixed"])
def test_mlx_gemma4_mlx_vlm_and_mlx_lm_give_the_same_logits(converted, bits):
    ours = ours_logits(converted[bits])
    np.testing.assert_allclose(mlx_vlm_logits(converted[bits]), ours, atol=PEER_TOLERANCE, rtol=0)
    np.testing.assert_allclose(mlx_lm_logits(converted[bits]), ours, atol=PEER_TOLERANCE, rtol=0)


def test_8_bit_logits_track_the_unquantized_reference(source, converted):
    expected = reference_logits(source[1], PROMPT)
    logits = ours_logits(converted[8])
    difference = np.abs(logits - expected) / expected.std()
    assert difference.mean() <= EIGHT_BIT_MEAN_TOLERANCE and difference.max() <= EIGHT_BIT_MAX_TOLERANCE
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))


def test_mixed_recipe_records_its_8_bit_layers_in_the_config(converted):
    quantization = json.loads((converted["mixed"] / "config.json").read_text())["quantization"]
    eight_bit = {"group_size": 64, "bits": 8, "mode": "affine"}
    assert quantization["language_model.model.embed_tokens"] == eight_bit
    assert quantization["language_model.model.layers.0.self_attn.v_proj"] == eight_bit
    assert quantization["language_model.model.layers.1.self_attn.k_proj"] == eight_bit  # full layer: K = V
    assert "language_model.model.layers.0.self_attn.k_proj" not in quantization
    model = load_model(converted["mixed"])
    assert model.language_model.model.layers[0].self_attn.v_proj.bits == 8
    assert model.language_model.model.layers[0].self_attn.q_proj.bits == 4


def test_mlp_recipe_puts_exactly_the_mlp_projections_at_8_bits(source):
    plan = plan_quantization(make_layout(read_checkpoint(source[0])), QuantizationSettings(recipe="mlp_8"))
    eight_bit = {path for path, params in plan.items() if params["bits"] == 8}
    assert eight_bit and eight_bit == {path for path in plan if ".mlp." in path}
    assert {params["bits"] for path, params in plan.items() if path not in eight_bit} == {4}


def test_converted_folder_loads_with_its_processor(converted):
    model, processor = load(converted[4])
    assert processor.encode("The quick brown fox")


def test_existing_destination_is_refused_without_force(source, tmp_path, capsys):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    code, err = run_cli(["--hf-path", source[0], "--mlx-path", destination, "-q"], capsys)
    assert code == 1 and len(err) == 1 and "--force" in err[0]
    assert [p.name for p in destination.iterdir()] == ["keep.txt"]


def test_force_replaces_the_destination_whole(source, tmp_path, capsys):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "stale.txt").write_text("old")
    code, _ = run_cli(["--hf-path", source[0], "--mlx-path", destination, "-q", "--q-bits", "8", "--force"], capsys)
    assert code == 0
    assert not (destination / "stale.txt").exists() and (destination / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_conversion_leaves_no_destination_and_no_staging(source, tmp_path, monkeypatch, capsys):
    from convert import pipeline

    written = []

    def interrupt_after_first_shard(path, groups, progress=None):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        return real_write_shard(path, groups, progress)

    real_write_shard = pipeline.write_shard
    monkeypatch.setattr(pipeline, "write_shard", interrupt_after_first_shard)
    code, err = run_cli(["--hf-path", source[0], "--mlx-path", tmp_path / "out", "-q"], capsys)
    assert code == 130 and len(err) == 1 and written
    assert list(tmp_path.iterdir()) == []


def copy_checkpoint(source: Path, destination: Path) -> Path:
    destination.mkdir()
    for file in source.iterdir():
        (destination / file.name).write_bytes(file.read_bytes())
    return destination


@pytest.mark.parametrize("breakage, message", [
    ("missing_shard", "named by model.safetensors.index.json is missing"),
    ("shape_mismatch", "shape mismatch"),
    ("unknown_model_type", "model_type 'llama' is not Gemma 4 unified"),
    ("pickled_only", "pickled weights are never loaded"),
])
def test_input_errors_stop_with_one_line_before_writing(source, tmp_path, capsys, breakage, message):
    broken = copy_checkpoint(source[0], tmp_path / "hf")
    config = json.loads((broken / "config.json").read_text())
    if breakage == "missing_shard":
        (broken / "model-00002-of-00004.safetensors").unlink()
    elif breakage == "shape_mismatch":
        config["text_config"]["intermediate_size"] = 192
    elif breakage == "unknown_model_type":
        config["model_type"] = "llama"
    elif breakage == "pickled_only":
        for file in broken.glob("model*"):
            file.unlink()
        (broken / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    (broken / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["--hf-path", broken, "--mlx-path", tmp_path / "out", "-q"], capsys)
    assert code == 1 and len(err) == 1 and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def gguf_q4_0(weight: np.ndarray) -> tuple:
    """llama.cpp's q4_0 of a matrix, by the `gguf` package (independent of convert/qat.py): (codes 0..15, the
    weights it dequantizes to), both shaped like `weight`, in float32."""
    import gguf

    q4_0 = gguf.GGMLQuantizationType.Q4_0
    blocks = gguf.quantize(weight.astype(np.float32), q4_0).reshape(*weight.shape[:-1], -1, 18)
    packed = blocks[..., 2:]  # 2 bytes of float16 step, then 16 bytes of codes: low nibbles first, then high ones
    codes = np.concatenate([packed & 15, packed >> 4], axis=-1).reshape(weight.shape)
    return codes, gguf.dequantize(blocks.reshape(-1), q4_0).reshape(weight.shape)


def snap_to_q4_0_grid(source: Path, destination: Path) -> dict:
    """A QAT-like checkpoint: every matrix of width divisible by 32 replaced by what llama.cpp's q4_0 makes of it,
    stored in bfloat16 as QAT checkpoints are."""
    copy_checkpoint(source, destination)
    snapped = {}
    for file in destination.glob("*.safetensors"):
        weights = mx.load(str(file))
        for name, value in weights.items():
            value = value.astype(mx.bfloat16)
            if value.ndim == 2 and value.shape[-1] % qat.BLOCK_SIZE == 0:
                value = mx.array(gguf_q4_0(np.array(value.astype(mx.float32)))[1]).astype(mx.bfloat16)
                snapped[name] = value
            weights[name] = value
        mx.save_safetensors(str(file), weights, metadata={"format": "pt"})
    return snapped


def unpack_4_bit_codes(packed: np.ndarray) -> np.ndarray:
    shifts = np.arange(32 // 4, dtype=np.uint32) * 4
    return ((packed[..., None] >> shifts) & 15).reshape(*packed.shape[:-1], -1)


@pytest.mark.parametrize("name, path", [
    ("model.language_model.layers.1.self_attn.q_proj.weight", "language_model.model.layers.1.self_attn.q_proj"),
    ("model.language_model.embed_tokens.weight", "language_model.model.embed_tokens"),
])
def test_qat_mode_stores_llama_cpps_q4_0_codes_and_weights(source, tmp_path, monkeypatch, name, path):
    monkeypatch.setattr(qat, "CHUNK_WEIGHTS", 1000)  # several row blocks per matrix, as on the real model
    snapped = snap_to_q4_0_grid(source[0], tmp_path / "qat")
    folder = convert(str(tmp_path / "qat"), str(tmp_path / "out"), qat=True, progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    stored = {}
    for file in folder.glob("*.safetensors"):
        stored.update(mx.load(str(file)))
    codes, dequantized = gguf_q4_0(np.array(snapped[name].astype(mx.float32)))
    np.testing.assert_array_equal(unpack_4_bit_codes(np.array(stored[f"{path}.weight"])), codes)
    scales, biases = stored[f"{path}.scales"], stored[f"{path}.biases"]
    assert mx.array_equal(biases, -8 * scales)
    restored = mx.dequantize(stored[f"{path}.weight"], scales.astype(mx.float32), biases.astype(mx.float32), 32, 4)
    np.testing.assert_array_equal(np.array(restored), dequantized)


def test_qat_mode_refuses_weights_off_the_grid(source, tmp_path, capsys):
    code, err = run_cli(["--hf-path", source[0], "--mlx-path", tmp_path / "out", "--qat"], capsys)
    assert code == 1 and len(err) == 1 and "not on the q4_0 grid" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_assistant_converts_linear_and_embedding_weights_and_keeps_the_rest(tmp_path):
    save_assistant_checkpoint(tmp_path / "hf")
    folder = convert(str(tmp_path / "hf"), str(tmp_path / "out"), quantize=True, progress=False)
    stored = {}
    for file in folder.glob("*.safetensors"):
        stored.update(mx.load(str(file)))
    for path in ("model.embed_tokens", "pre_projection", "post_projection", "masked_embedding.centroids",
                 "model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"):
        assert stored[f"{path}.weight"].dtype == mx.uint32 and f"{path}.scales" in stored
    assert stored["masked_embedding.token_ordering"].dtype == mx.int64
    assert stored["model.layers.0.input_layernorm.weight"].dtype == mx.float32
    assert "lm_head.weight" not in stored
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma4_unified_assistant" and config["quantization"]["bits"] == 4
    drafter = load_drafter(folder)
    plain = [name for name, module in drafter.named_modules() if type(module) in (nn.Linear, nn.Embedding)]
    assert plain == []


class RecordingHub:
    """Stands in for HfApi's network methods and records what the converter asked of them."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi

        self.calls = []
        for method in ("create_repo", "upload_folder"):
            monkeypatch.setattr(HfApi, method, self.recorder(method))

    def recorder(self, method):
        return lambda api, **kwargs: self.calls.append((method, kwargs))


def test_upload_creates_the_repo_and_uploads_the_folder(converted, monkeypatch, capsys):
    hub = RecordingHub(monkeypatch)
    code, _ = run_cli(["--mlx-path", converted[4], "--upload-repo", "me/gemma-4-mlx-4bit"], capsys)
    assert code == 0
    (create, created), (upload, uploaded) = hub.calls
    assert created == {"repo_id": "me/gemma-4-mlx-4bit", "repo_type": "model", "exist_ok": True}
    assert uploaded["folder_path"] == str(converted[4]) and uploaded["repo_id"] == "me/gemma-4-mlx-4bit"
    assert "mlx-gemma4" in uploaded["commit_message"]


def test_dry_run_lists_the_files_and_uploads_nothing(converted, monkeypatch, capsys):
    hub = RecordingHub(monkeypatch)
    code = main(["--mlx-path", str(converted[4]), "--upload-repo", "me/x", "--dry-run"])
    listing = capsys.readouterr().out
    assert code == 0 and hub.calls == []
    assert "config.json" in listing and "model.safetensors.index.json" in listing and "README.md" in listing


def test_upload_without_network_fails_with_one_line(converted, capsys):
    # conftest sets HF_HUB_OFFLINE: huggingface_hub refuses every request, as it does without a network.
    code, err = run_cli(["--mlx-path", converted[4], "--upload-repo", "me/x"], capsys)
    assert code == 1 and len(err) == 1 and "upload to me/x failed" in err[0]


def readme_upload_command() -> list:
    """The README's upload example, as arguments for convert.py's main."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("python convert/convert.py") and "--upload-repo" in line)
    return shlex.split(line)[2:]


def test_the_readmes_upload_example_uploads_an_existing_converted_folder(converted, monkeypatch, capsys):
    hub = RecordingHub(monkeypatch)
    example_folder = "gemma-4-12B-it-4bit"
    arguments = [str(converted[4]) if argument == example_folder else argument for argument in readme_upload_command()]
    assert str(converted[4]) in arguments
    code = main(arguments)
    listing = capsys.readouterr().out
    assert code == 0 and hub.calls == []
    assert f"from {converted[4]} to https://huggingface.co/" in listing and "config.json" in listing


def test_converting_an_already_quantized_folder_is_refused_in_one_line(converted, tmp_path, capsys):
    code, err = run_cli(["--hf-path", converted[4], "--mlx-path", tmp_path / "again", "-q"], capsys)
    assert code == 1 and len(err) == 1
    assert "is already quantized" in err[0] and "without --hf-path" in err[0]
    assert list(tmp_path.iterdir()) == []


KILLED_CONVERSION = """
import os, signal, sys
from pathlib import Path
from convert.staging import staged_folder
with staged_folder(Path(sys.argv[1]), replace=False) as staging:
    (staging / "model-00001-of-00002.safetensors").write_bytes(bytes(2_000_000))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_next_conversion_removes_a_killed_ones_staging_folder_and_says_so(source, tmp_path, capsys):
    destination = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_CONVERSION, str(destination)],
                            cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert killed.returncode == -signal.SIGKILL
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".out.partial-")
    users = tmp_path / ".out.partial-mine"  # named like a staging folder, but not named by the converter
    users.mkdir()
    code, err = run_cli(["--hf-path", source[0], "--mlx-path", destination, "-q"], capsys)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-mine", "out"]
    assert any(line.startswith(f"note: removed {leftover} (2.0 MB)") for line in err)
    assert any(line.startswith(f"note: left {users} alone") for line in err)


def test_a_running_conversions_staging_folder_is_left_alone(tmp_path):
    from convert.staging import remove_stale_staging

    running = tmp_path / f".out.partial-{os.getpid()}-abc123"
    running.mkdir()
    assert remove_stale_staging(tmp_path / "out") == [] and running.is_dir()


def card_for(source: Path, tmp_path: Path, name: str) -> str:
    return (convert(str(source), str(tmp_path / name), q_bits=8, progress=False) / "README.md").read_text()


def test_the_model_card_copies_the_source_cards_licence(source, tmp_path):
    with_card = copy_checkpoint(source[0], tmp_path / "hf")
    (with_card / "README.md").write_text(
        "---\nlicense: gemma\nlicense_link: https://ai.google.dev/gemma/terms\nlibrary_name: transformers\n---\n# Gemma\n"
    )
    card = card_for(with_card, tmp_path, "out")
    assert card.startswith("---\nlicense: gemma\nlicense_link: https://ai.google.dev/gemma/terms\n")
    assert "[gemma](https://ai.google.dev/gemma/terms)" in card and "Apache" not in card


def test_without_a_source_licence_the_card_says_the_base_models_terms_apply(source, converted):
    card = (converted[4] / "README.md").read_text()
    assert "license:" not in card and "Apache" not in card
    assert "The base model's terms" in card


def test_the_model_card_installs_only_what_can_be_installed(converted):
    card = (converted[4] / "README.md").read_text()
    assert "pip install mlx-gemma4" not in card
    assert "pip install -U mlx-vlm" in card and f"python -m mlx_vlm.generate --model {converted[4]}" in card
    assert "pip install -e .   # in a checkout of the mlx-gemma4 repository" in card
    assert f"mlx-gemma4 --model {converted[4]}" in card
