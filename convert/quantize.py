"""Which layers get quantized and how, the config block that records it, and the per-tensor conversion.

The rule is mlx-lm's (`quantize_model`): a Linear or Embedding layer is quantized when its weight's last dimension
is a multiple of the group size; a recipe may give a layer other bits or keep it unquantized. The config block is
the one mlx-lm and mlx-vlm read: {"group_size", "bits", "mode"} plus one entry per layer that differs.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from mlx_gemma4.errors import Gemma4Error

from . import qat
from .layout import Layout
from .recipes import RECIPES
from .shards import SourceTensor

DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
BITS_CHOICES = (4, 8)
GROUP_SIZE_CHOICES = (32, 64, 128)
MODE = "affine"


@dataclass
class QuantizationSettings:
    bits: int = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP_SIZE
    recipe: Optional[str] = None
    qat: bool = False

    @classmethod
    def from_flags(cls, bits=None, group_size=None, recipe=None, use_qat=False) -> "QuantizationSettings":
        if use_qat:
            if bits not in (None, qat.BITS) or group_size not in (None, qat.BLOCK_SIZE) or recipe:
                raise Gemma4Error(
                    f"--qat maps q4_0 weights exactly: it fixes {qat.BITS} bits, group size {qat.BLOCK_SIZE} "
                    "and no recipe"
                )
            return cls(qat.BITS, qat.BLOCK_SIZE, None, True)
        if recipe is not None and recipe not in RECIPES:
            raise Gemma4Error(f"unknown --quant-predicate {recipe!r} (choose from {sorted(RECIPES)})")
        return cls(bits or DEFAULT_BITS, group_size or DEFAULT_GROUP_SIZE, recipe, False)

    @property
    def default(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": MODE}

    def describe(self) -> str:
        if self.qat:
            return f"q4_0 QAT weights mapped exactly onto {self.bits}-bit affine, group size {self.group_size}"
        base = f"{self.bits}-bit affine, group size {self.group_size}"
        return f"{base}, recipe {self.recipe} ({RECIPES[self.recipe].summary})" if self.recipe else base


def plan_quantization(layout: Layout, settings: QuantizationSettings) -> dict:
    """module path -> {"group_size", "bits", "mode"} for every layer to quantize."""
    recipe = None
    if settings.recipe:
        recipe = RECIPES[settings.recipe].build(layout.full_attention_layers, layout.num_layers, settings.group_size)
    plan = {}
    for path, shape in sorted(layout.quantizable.items()):
        if shape[-1] % settings.group_size:
            continue
        params = settings.default
        if recipe is not None:
            choice = recipe(path)
            if choice is False:
                continue
            if isinstance(choice, dict):
                params = {**choice, "mode": MODE}
                if shape[-1] % params["group_size"]:
                    continue
        plan[path] = params
    return plan


def config_block(settings: QuantizationSettings, plan: dict) -> dict:
    """Top-level defaults plus the layers whose settings differ (what mlx-lm's quantize_model records)."""
    block = dict(settings.default)
    block.update({path: params for path, params in plan.items() if params != settings.default})
    return block


def convert_tensor(name: str, array: mx.array, params: Optional[dict], dtype, use_qat: bool) -> SourceTensor:
    """Lazy outputs for one source tensor: cast to `dtype`, or quantized into weight, scales and biases."""
    if dtype is not None and mx.issubdtype(array.dtype, mx.floating):
        array = array.astype(dtype)
    if params is None:
        return SourceTensor(name, {name: array})
    path = name.removesuffix(".weight")
    if use_qat:
        weight, scales, biases, _ = qat.quantize_on_grid(array)
        outputs = {f"{path}.weight": weight, f"{path}.scales": scales, f"{path}.biases": biases}
        return SourceTensor(name, outputs, materialize=lambda: qat.map_in_chunks(name, array))
    weight, scales, biases = mx.quantize(array, params["group_size"], params["bits"])
    return SourceTensor(name, {f"{path}.weight": weight, f"{path}.scales": scales, f"{path}.biases": biases})
