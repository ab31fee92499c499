"""MLX's quantized layers with their products sent through `quantized_matvec.quantized_matmul`, which takes the
few-row CUDA kernel where its rule says so and MLX's own kernel everywhere else. Nothing else about the layers
changes: same parameters, same names, still instances of MLX's classes."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .quantized_matvec import gated_quantized_matmul, gates_in_kernel, quantized_matmul


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        out = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits,
                               self.mode)
        return out + self["bias"] if "bias" in self else out

    def can_gate_in_kernel(self, x: mx.array) -> bool:
        """Whether tanh_gated can run for x: the kernel's rule for a stacked gate and up projection, and no bias
        (it would have to be added before the gating)."""
        return "bias" not in self and gates_in_kernel(x, self["weight"], self["scales"], self.get("biases"),
                                                      self.group_size, self.bits, self.mode)

    def tanh_gated(self, x: mx.array) -> mx.array:
        """gelu_tanh(gate) * up for [gate | up] = the layer's output (a stacked gate and up projection), gated in the
        product's kernel: only where can_gate_in_kernel(x)."""
        return gated_quantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)


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
