"""MLX's quantized layers with their products sent through `quantized_matvec.quantized_matmul`, which takes the
few-row CUDA kernel where its rule says so and MLX's own kernel everywhere else. Nothing else about the layers
changes: same parameters, same names, still instances of MLX's classes."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .quantized_matvec import gated_quantized_matmul, quantized_matmul


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        out = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits,
                               self.mode)
        return out + self["bias"] if "bias" in self else out

    def tanh_gated(self, x: mx.array, tanh_gate) -> mx.array:
        """tanh_gate(gate, up) = gelu_tanh(gate) * up for [gate | up] = the layer's output (a stacked gate and up
        projection)."""
        if "bias" in self:
            return tanh_gate(*mx.split(self(x), 2, axis=-1))
        return gated_quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size,
                                      self.bits, self.mode, tanh_gate)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        """The tied output head."""
        return quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits,
                                self.mode)


REPLACEMENTS = {nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding}


def same_layer_as(replacement_class, layer: nn.Module) -> nn.Module:
    """An instance of `replacement_class` holding `layer`'s arrays and settings (shared, not copied)."""
    replacement = replacement_class.__new__(replacement_class)
    vars(replacement).update(vars(layer))
    dict.update(replacement, layer)
    return replacement


def use_few_row_products(module: nn.Module) -> nn.Module:
    """Swap every plain MLX quantized layer in `module` (a loaded model or drafter) for its counterpart here."""
    swaps = [(path, same_layer_as(REPLACEMENTS[type(child)], child))
             for path, child in module.named_modules() if type(child) in REPLACEMENTS]
    if swaps:
        module.update_modules(tree_unflatten(swaps))
    return module
