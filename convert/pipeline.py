"""Hugging Face Gemma 4 unified checkpoint (or its MTP assistant) to an MLX folder, one shard at a time.

Everything a user can get wrong (source, model type, shards, shapes, flags, destination) is checked before the first
byte is written; the output is staged beside the destination and renamed into place at the end.
"""

import shutil
import sys
from math import prod
from pathlib import Path
from typing import Optional

import mlx.core as mx

from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.loading import DTYPES, resolve_model_path

from .checkpoint import Checkpoint, read_checkpoint
from .config_file import source_dtype_name, write_config
from .layout import Layout, make_layout
from .model_card import CardFacts, source_licence, write_model_card
from .quantize import QuantizationSettings, config_block, convert_tensor, plan_quantization
from .shards import shard_name, write_index, write_shard
from .staging import check_destination, remove_stale_staging, staged_folder

# Everything beside the weights that loaders read: tokenizer, chat template, generation and processor settings.
# Never code (*.py) and never the source's README (the card is rewritten).
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "generation_config.json", "processor_config.json",
    "preprocessor_config.json", "video_preprocessor_config.json",
)


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

    for note in remove_stale_staging(destination):
        print(note, file=sys.stderr)
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
            licence=source_licence(source),
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
