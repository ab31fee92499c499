"""Hugging Face Gemma 4 unified checkpoint (or its MTP assistant) to an MLX folder, one shard at a time.

Everything a user can get wrong (source, model type, shards, shapes, flags, destination) is checked before the first
byte is written; the output is staged beside the destination and renamed into place at the end.
"""

import copy
import json
import shutil
from math import prod
from pathlib import Path
from typing import Optional

import mlx.core as mx

from mlx_gemma4.config import FULL, TextConfig
from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.loading import DTYPES, resolve_model_path

from .checkpoint import Checkpoint, read_checkpoint
from .layout import Layout, make_layout
from .model_card import CardFacts, write_model_card
from .quantize import QuantizationSettings, config_block, convert_tensor, plan_quantization
from .shards import shard_name, write_index, write_shard
from .staging import check_destination, staged_folder

# Everything beside the weights that loaders read: tokenizer, chat template, generation and processor settings.
# Never code (*.py) and never the source's README (the card is rewritten).
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "generation_config.json", "processor_config.json",
    "preprocessor_config.json", "video_preprocessor_config.json",
)


def source_dtype_name(config: dict) -> Optional[str]:
    text_config = config.get("text_config") or {}
    for value in (config.get("dtype"), config.get("torch_dtype"), text_config.get("dtype")):
        if value in DTYPES:
            return value
    return None


def output_groups(file: Path, layout: Layout, plan: dict, dtype, use_qat: bool) -> list:
    """The lazy outputs of one input shard. The loaded dict is emptied so that each source array is referenced only
    by its own outputs, and is freed as soon as they are written."""
    lazy = mx.load(str(file))
    checkpoint_to_ours = {source: ours for ours, source in layout.source_names.items()}
    groups = []
    for source_name in sorted(lazy):
        array = lazy.pop(source_name)
        name = checkpoint_to_ours.get(source_name)
        if name is None:
            continue
        path = layout.path_of(name)
        groups.append(convert_tensor(name, array, plan.get(path), dtype, use_qat))
    return groups


def add_peer_config_keys(text_config: dict):
    """Keys mlx-lm and mlx-vlm need to read this text config as transformers and mlx-gemma4 do.

    transformers 5.23 saves full-attention head sizes only as `per_layer_config`; the peers read `global_head_dim`
    and `num_global_key_value_heads`. Where the overrides are the same on every full layer, those keys are written
    too (transformers and mlx-gemma4 let `per_layer_config` win). mlx-lm's Gemma 4 text model assumes per-layer
    input embeddings and KV sharing (the E2B/E4B models) unless told otherwise; where the unified config leaves
    them out they are 0, as transformers reads them.
    """
    text_config.setdefault("hidden_size_per_layer_input", 0)
    text_config.setdefault("num_kv_shared_layers", 0)
    # Peers default to other layer patterns; spell out the one mlx-gemma4 and transformers derive.
    text_config.setdefault("layer_types", TextConfig.from_dict(text_config).layer_types)
    overrides = text_config.get("per_layer_config")
    full = [str(i) for i, kind in enumerate(text_config.get("layer_types") or []) if kind == FULL]
    if not overrides or sorted(overrides, key=int) != full:
        return
    distinct = {json.dumps(values, sort_keys=True) for values in overrides.values()}
    if len(distinct) != 1:
        return
    values = next(iter(overrides.values()))
    if "head_dim" in values:
        text_config.setdefault("global_head_dim", values["head_dim"])
    if "num_key_value_heads" in values:
        text_config.setdefault("num_global_key_value_heads", values["num_key_value_heads"])


def write_config(folder: Path, config: dict, quantization: Optional[dict], dtype_name: Optional[str]):
    config = copy.deepcopy(config)
    config.pop("_name_or_path", None)
    if isinstance(config.get("text_config"), dict):
        add_peer_config_keys(config["text_config"])
        # mlx-lm's gemma4 wrapper overwrites the text vocabulary size with a top-level one (default 262144).
        config.setdefault("vocab_size", config["text_config"].get("vocab_size"))
    elif config.get("model_type") == "gemma4_unified_text":
        add_peer_config_keys(config)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if quantization is not None:
        # mlx-lm reads "quantization", mlx-vlm and Hugging Face tooling "quantization_config"; both say the same.
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    if dtype_name is not None:
        for holder in (config, config.get("text_config") or {}):
            if "dtype" in holder or holder is config:
                holder["dtype"] = dtype_name
    (folder / "config.json").write_text(json.dumps(config, indent=4) + "\n")


def copy_side_files(source: Path, folder: Path):
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def base_model_id(hf_path: str, source: Path, config: dict) -> Optional[str]:
    """The Hub id to credit: the one converted from, else the one the checkpoint says it came from."""
    for candidate in (hf_path, config.get("_name_or_path")):
        if candidate and not Path(candidate).expanduser().exists() and str(candidate).count("/") == 1:
            return str(candidate)
    return None


def make_progress(total_bytes: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="converting", disable=not enabled)


def convert(
    hf_path: str,
    mlx_path: str,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    dtype: Optional[str] = None,
    quant_predicate: Optional[str] = None,
    qat: bool = False,
    force: bool = False,
    run_name: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Converts and returns the destination folder. `run_name` is the name the model card tells readers to load."""
    quantize = quantize or qat or quant_predicate is not None or q_bits is not None or q_group_size is not None
    settings = QuantizationSettings.from_flags(q_bits, q_group_size, quant_predicate, qat) if quantize else None
    if dtype is not None and dtype not in DTYPES:
        raise Gemma4Error(f"--dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    destination = Path(mlx_path).expanduser()
    check_destination(destination, force)
    source = resolve_model_path(hf_path)
    checkpoint = read_checkpoint(source)
    layout = make_layout(checkpoint)
    plan = plan_quantization(layout, settings) if settings else {}
    dtype_name = dtype or source_dtype_name(checkpoint.config)
    target_dtype = DTYPES[dtype_name] if dtype_name else None

    with staged_folder(destination, force) as staging:
        total_size, parameters = write_weights(staging, checkpoint, layout, plan, target_dtype, settings, progress)
        quantization = config_block(settings, plan) if settings else None
        write_config(staging, checkpoint.config, quantization, dtype_name)
        copy_side_files(source, staging)
        write_model_card(staging, CardFacts(
            base_model=base_model_id(hf_path, source, checkpoint.config),
            quantization=settings.describe() if settings else f"not quantized ({dtype_name or 'source dtype'})",
            size_bytes=total_size,
            bits_per_weight=8 * total_size / parameters if settings else None,
            is_assistant=checkpoint.is_assistant,
            run_name=run_name or str(destination),
        ))
    return destination


def write_weights(folder: Path, checkpoint: Checkpoint, layout: Layout, plan, dtype, settings, progress) -> tuple:
    """Writes every output shard and the index; returns (bytes written, parameters before quantization)."""
    use_qat = bool(settings and settings.qat)
    shards = [output_groups(file, layout, plan, dtype, use_qat) for file in checkpoint.files]
    shards = [groups for groups in shards if groups]
    total_size = sum(group.nbytes for groups in shards for group in groups)
    parameters = sum(prod(checkpoint.tensors[s].shape) for s in layout.source_names.values())
    weight_map = {}
    with make_progress(total_size, progress) as bar:
        for index, groups in enumerate(shards):
            weight_map.update(write_shard(folder / shard_name(index, len(shards)), groups, bar))
            shards[index] = None
    write_index(folder, weight_map, total_size, parameters)
    return total_size, parameters
