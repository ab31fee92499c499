"""Streaming safetensors writer: one output shard per input shard, one source tensor in memory at a time.

`mx.load` on a safetensors file is lazy: an array reads its bytes only when evaluated. The header of an output
shard is written from the lazy outputs' shapes and dtypes (known without evaluating), then each source tensor's
outputs (a cast, or quantized weight + scales + biases) are evaluated and appended to the file, and every reference
to them is dropped. Resident memory is therefore about one source tensor and its outputs, whatever the shard size.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.loading import WEIGHTS_INDEX

SAFETENSORS_DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.uint32: "U32",
    mx.int32: "I32", mx.uint64: "U64", mx.int64: "I64", mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32",
    mx.float64: "F64",
}
# safetensors pads its JSON header so that tensor data starts 8-byte aligned.
HEADER_ALIGNMENT = 8


@dataclass
class SourceTensor:
    """The lazy outputs made from one source tensor; evaluated together, written together."""

    source_name: str
    outputs: dict  # output name -> lazy mx.array
    # Optional callable returning the evaluated outputs in the same order, each an array or a list of row blocks
    # that concatenate to it, for conversions that must run in pieces to bound memory (the lazy `outputs` then only
    # give the header its shapes and dtypes).
    materialize: object = None

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.outputs.values())


def shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def header_bytes(groups: list) -> bytes:
    header, offset = {}, 0
    for group in groups:
        for name, array in group.outputs.items():
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[array.dtype],
                "shape": list(array.shape),
                "data_offsets": [offset, offset + array.nbytes],
            }
            offset += array.nbytes
    header["__metadata__"] = {"format": "mlx"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return len(text).to_bytes(8, "little") + text


def write_shard(path: Path, groups: list, progress=None) -> dict:
    """Writes `groups` (consumed: each entry is dropped once written) to `path`; returns {tensor name: file name}."""
    names = {name: path.name for group in groups for name in group.outputs}
    with open(path, "wb") as file:
        file.write(header_bytes(groups))
        for index in range(len(groups)):
            group = groups[index]
            groups[index] = None
            outputs = group.materialize() if group.materialize else group.outputs.values()
            arrays = [mx.contiguous(piece) for output in outputs for piece in (
                output if isinstance(output, list) else [output])]
            mx.eval(*arrays)
            for array in arrays:
                file.write(memoryview(array))
            if progress is not None:
                progress.update(group.nbytes)
            del group, outputs, arrays
    return names


def write_index(folder: Path, weight_map: dict, total_size: int, total_parameters: int):
    index = {
        "metadata": {"total_size": total_size, "total_parameters": total_parameters},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=4) + "\n")
