"""Loading: local folders, shards, HF or converted names, stored dtypes, quantized weights, and clean errors."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gemma4.config import ModelConfig
from mlx_gemma4.decoder import checkpoint_weights
from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.loading import load, load_model, read_weights, weight_files
from mlx_gemma4.model import Model
from reference_models import reference_logits, save_reference_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    return folder, save_reference_checkpoint(folder, seed=3)


@pytest.fixture
def copy_of(checkpoint, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(checkpoint[0], folder)
    return folder


IDS = np.array([[2, 40, 41, 300, 17, 99, 5, 250]])


def test_sharded_checkpoint_with_index_loads(checkpoint, tmp_path):
    _, reference = checkpoint
    reference.save_pretrained(str(tmp_path), max_shard_size="100KB")
    shutil.copy(checkpoint[0] / "tokenizer.json", tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = load_model(tmp_path)
    assert np.abs(np.array(model(mx.array(IDS))) - reference_logits(reference, IDS)).max() <= 1e-4


def test_converted_names_load_like_hugging_face_names(checkpoint, tmp_path):
    folder, reference = checkpoint
    model = load_model(folder)
    shutil.copy(folder / "config.json", tmp_path)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), checkpoint_weights(model))
    again = load_model(tmp_path)
    assert np.array_equal(np.array(again(mx.array(IDS))), np.array(model(mx.array(IDS))))


def test_stored_dtype_is_kept_unless_asked(checkpoint, tmp_path):
    folder, reference = checkpoint
    reference.to(dtype=__import__("torch").bfloat16).save_pretrained(str(tmp_path))
    reference.float()
    assert load_model(tmp_path).language_model.model.norm.weight.dtype == mx.bfloat16
    assert load_model(tmp_path, dtype="float32").language_model.model.norm.weight.dtype == mx.float32


def test_quantized_checkpoint_loads_with_its_quantization_block(tmp_path):
    source = tmp_path / "source"
    save_reference_checkpoint(source, dict(hidden_size=64, intermediate_size=96), vision=False, audio=False)
    model = load_model(source)
    # Keep the test tiny: quantize the MLP inputs only (MLX's CPU quantized kernels are slow).
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda path, module: path.endswith("gate_up"))
    expected = np.array(model(mx.array(IDS)))
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 8, "mode": "affine"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), checkpoint_weights(model))
    again = load_model(tmp_path)
    assert isinstance(again.language_model.model.layers[0].mlp.gate_up, nn.QuantizedLinear)
    assert isinstance(again.language_model.model.layers[0].mlp.down_proj, nn.Linear)
    assert np.array_equal(np.array(again(mx.array(IDS))), expected)


def unfused_model(folder):
    """The checkpoint in a Model as built, gate and up projections apart."""
    model = Model(ModelConfig.from_dict(json.loads((folder / "config.json").read_text())))
    model.load_weights(list(model.sanitize(read_weights(weight_files(folder))).items()))
    return model


def test_gate_and_up_projections_run_as_one_matmul_with_the_same_logits(checkpoint):
    folder, _ = checkpoint
    model = load_model(folder)
    assert all("gate_up" in layer.mlp and "gate_proj" not in layer.mlp for layer in model.language_model.model.layers)
    fused, apart = model(mx.array(IDS)), unfused_model(folder)(mx.array(IDS))
    assert mx.abs(fused - apart).max().item() <= 1e-6 * mx.abs(apart).max().item()


def test_query_key_and_value_projections_run_as_one_matmul_with_the_same_logits(checkpoint):
    folder, _ = checkpoint
    model = load_model(folder)
    attention = [layer.self_attn for layer in model.language_model.model.layers]
    assert all("qkv" in layer and "q_proj" not in layer for layer in attention if len(layer.projection_names()) > 1)
    fused, apart = model(mx.array(IDS)), unfused_model(folder)(mx.array(IDS))
    assert mx.abs(fused - apart).max().item() <= 1e-6 * mx.abs(apart).max().item()


def test_fused_attention_projections_are_written_under_the_checkpoint_names(checkpoint):
    folder, _ = checkpoint
    written = checkpoint_weights(load_model(folder))
    stored = unfused_model(folder).parameters()
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(stored))
    assert set(written) == set(expected)
    assert all(mx.array_equal(written[name], expected[name]) for name in expected if ".self_attn." in name)


def test_a_mixed_recipe_keeps_differently_quantized_gate_and_up_apart(tmp_path):
    source = tmp_path / "source"
    save_reference_checkpoint(source, dict(hidden_size=64, intermediate_size=96), vision=False, audio=False)
    model = unfused_model(source)
    up = "language_model.model.layers.0.mlp.up_proj"
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda path, module: (
        {"group_size": 32, "bits": 8} if path == up else path.endswith("gate_proj")))
    expected = np.array(model(mx.array(IDS)))
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine", up: {"group_size": 32, "bits": 8}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(nn.utils.tree_flatten(model.parameters())))
    again = load_model(tmp_path)
    layers = again.language_model.model.layers
    assert "gate_proj" in layers[0].mlp and layers[0].mlp.up_proj.bits == 8
    assert "gate_up" not in layers[1].mlp  # float up beside a quantized gate: kept apart too
    assert np.array_equal(np.array(again(mx.array(IDS))), expected)


def test_load_returns_a_processor_with_the_chat_template(checkpoint):
    _, processor = load(checkpoint[0])
    prompt = processor.chat_prompt("hi", system_prompt="be brief")
    assert prompt.startswith("<bos><|turn>system\nbe brief<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n")
    assert processor.tokenizer.convert_tokens_to_ids("<turn|>") in processor.stop_token_ids


def expect_error(path, fragment):
    with pytest.raises(Gemma4Error) as raised:
        load(path)
    message = str(raised.value)
    assert fragment in message and "\n" not in message
    return message


def test_missing_folder_is_a_clean_error(tmp_path):
    expect_error(tmp_path / "nowhere", "not found")


def test_unknown_repo_while_offline_is_a_clean_error():
    expect_error("nobody-here/no-such-model", "could not fetch")


def test_missing_shard_is_named(checkpoint, tmp_path):
    checkpoint[1].save_pretrained(str(tmp_path), max_shard_size="100KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[0]
    shard.unlink()
    expect_error(tmp_path, shard.name)


def test_truncated_weights_are_a_clean_error(copy_of):
    weights = copy_of / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    expect_error(copy_of, "corrupt or truncated")


def test_corrupt_config_is_a_clean_error(copy_of):
    (copy_of / "config.json").write_text("{ not json")
    expect_error(copy_of, "corrupt")


def test_wrong_model_type_is_a_clean_error(copy_of):
    config = json.loads((copy_of / "config.json").read_text())
    config["model_type"] = "llama"
    (copy_of / "config.json").write_text(json.dumps(config))
    expect_error(copy_of, "'llama' is not Gemma 4 unified")


def test_missing_tokenizer_is_a_clean_error(copy_of):
    (copy_of / "tokenizer.json").unlink()
    expect_error(copy_of, "no tokenizer")


def test_pickled_weights_are_refused(copy_of):
    (copy_of / "model.safetensors").unlink()
    (copy_of / "pytorch_model.bin").write_bytes(b"not loaded")
    expect_error(copy_of, "pickled weights are never loaded")


def test_weights_of_another_shape_are_a_clean_error(copy_of):
    config = json.loads((copy_of / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 8
    (copy_of / "config.json").write_text(json.dumps(config))
    expect_error(copy_of, "do not fit the config")
