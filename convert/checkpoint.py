"""The source checkpoint: config, safetensors shards and their headers, checked before anything is written.

Only safetensors headers are read here (a few kilobytes per shard); tensor data stays on disk until a shard is
converted. Pickled weights (.bin, .pt, .pth, .ckpt) are refused, never opened.
"""

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.json_files import read_json
from mlx_gemma4.loading import weight_files

UNIFIED_MODEL_TYPES = ("gemma4_unified", "gemma4_unified_text")
ASSISTANT_MODEL_TYPE = "gemma4_unified_assistant"
# A safetensors header longer than this is not a header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass
class TensorInfo:
    shape: tuple
    dtype: str  # safetensors name: "BF16", "F32", "I64", ...
    file: Path


@dataclass
class Checkpoint:
    path: Path
    config: dict
    files: list
    tensors: dict = field(default_factory=dict)  # Hugging Face name -> TensorInfo

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def is_assistant(self) -> bool:
        return self.model_type == ASSISTANT_MODEL_TYPE


def read_checkpoint(path: Path) -> Checkpoint:
    config = read_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type not in UNIFIED_MODEL_TYPES + (ASSISTANT_MODEL_TYPE,):
        raise Gemma4Error(
            f"{path}: model_type {model_type!r} is not Gemma 4 unified "
            f"(expected one of {UNIFIED_MODEL_TYPES + (ASSISTANT_MODEL_TYPE,)})"
        )
    if "quantization" in config or "quantization_config" in config:
        raise Gemma4Error(
            f"{path} is already quantized: convert from the unquantized checkpoint it was made from "
            "(to upload this folder as it is, pass it as --mlx-path without --hf-path)"
        )
    checkpoint = Checkpoint(path, config, weight_files(path))
    for file in checkpoint.files:
        for name, info in read_header(file).items():
            if name in checkpoint.tensors:
                raise Gemma4Error(f"{path}: tensor {name} is stored twice ({checkpoint.tensors[name].file.name}, {file.name})")
            checkpoint.tensors[name] = info
    return checkpoint


def read_header(file: Path) -> dict:
    size = file.stat().st_size
    with open(file, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise Gemma4Error(f"{file} is not a safetensors file (too short)")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            raise Gemma4Error(f"{file} is not a safetensors file (bad header length)")
        try:
            header = json.loads(stream.read(header_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Gemma4Error(f"{file} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_bytes
    tensors = {}
    for name, entry in header.items():
        if entry["data_offsets"][1] > data_bytes:
            raise Gemma4Error(f"{file} is truncated: tensor {name} ends past the end of the file")
        tensors[name] = TensorInfo(tuple(entry["shape"]), entry["dtype"], file)
    return tensors


def check_shapes(checkpoint: Checkpoint, source_names: dict, expected_shapes: dict, exhaustive: bool = True):
    """`source_names` maps our names to the checkpoint's: every expected tensor present with the config's shape and,
    when `exhaustive`, no tensor the config does not describe."""
    for name, shape in expected_shapes.items():
        if name not in source_names:
            raise Gemma4Error(f"{checkpoint.path}: tensor {name} that the config needs is missing from the checkpoint")
        found = checkpoint.tensors[source_names[name]].shape
        if tuple(found) != tuple(shape):
            raise Gemma4Error(
                f"{checkpoint.path}: shape mismatch for {source_names[name]}: checkpoint has {list(found)}, "
                f"config.json implies {list(shape)}"
            )
    unexpected = sorted(set(source_names) - set(expected_shapes))
    if exhaustive and unexpected:
        raise Gemma4Error(f"{checkpoint.path}: tensor {source_names[unexpected[0]]} does not belong to this config")
