"""Which source tensors become which output tensors, the shapes the config implies, and which layers may be quantized.

The unified model's names come from `mlx_gemma4.model.Model.sanitize` (the layout mlx-vlm and mlx-lm also read), its
shapes and quantizable layers from a `Model` built from config.json: its parameters stay lazy and are never
evaluated, so building it costs no memory. The MTP assistant keeps its Hugging Face names (as mlx-vlm's drafter
reads them) and is described from its tensors: every 2-D floating `*.weight` is a Linear or Embedding matrix.
"""

from dataclasses import dataclass, field

from mlx.utils import tree_flatten

from mlx_gemma4.config import FULL, ModelConfig
from mlx_gemma4.model import DERIVED_TENSORS, Model

from .checkpoint import Checkpoint, check_shapes

FLOATING_DTYPES = ("BF16", "F16", "F32", "F64")


@dataclass
class Layout:
    source_names: dict  # output name -> checkpoint name, for every tensor kept
    quantizable: dict  # module path -> weight shape, for Linear and Embedding layers
    num_layers: int
    full_attention_layers: set = field(default_factory=set)

    def path_of(self, name: str):
        """The module path whose weight `name` is, if that module may be quantized."""
        path = name.removesuffix(".weight")
        return path if name.endswith(".weight") and path in self.quantizable else None


def make_layout(checkpoint: Checkpoint) -> Layout:
    return assistant_layout(checkpoint) if checkpoint.is_assistant else unified_layout(checkpoint)


def unified_layout(checkpoint: Checkpoint) -> Layout:
    config = ModelConfig.from_dict(checkpoint.config)
    model = Model(config)
    source_names = model.sanitize({name: name for name in checkpoint.tensors})
    expected = {name: array.shape for name, array in tree_flatten(model.parameters())}
    check_shapes(checkpoint, source_names, expected)
    return model_layout(model, source_names)


def model_layout(model: Model, source_names: dict) -> Layout:
    quantizable = {
        path: module.weight.shape for path, module in model.named_modules() if hasattr(module, "to_quantized")
    }
    text = model.config.text_config
    full = {i for i, kind in enumerate(text.layer_types) if kind == FULL}
    return Layout(source_names, quantizable, text.num_hidden_layers, full)


def assistant_layout(checkpoint: Checkpoint) -> Layout:
    config = checkpoint.config
    text = config.get("text_config") or {}
    tied = config.get("tie_word_embeddings", True)
    source_names = {
        name: name
        for name in checkpoint.tensors
        if not any(part in name for part in DERIVED_TENSORS) and not (tied and name == "lm_head.weight")
    }
    hidden, vocab = text.get("hidden_size"), text.get("vocab_size")
    backbone = config.get("backbone_hidden_size", 3840)
    expected = {
        "model.embed_tokens.weight": (vocab, hidden),
        "pre_projection.weight": (hidden, 2 * backbone),
        "post_projection.weight": (backbone, hidden),
    }
    check_shapes(checkpoint, source_names, expected, exhaustive=False)
    quantizable = {
        name.removesuffix(".weight"): checkpoint.tensors[name].shape
        for name in source_names
        if name.endswith(".weight")
        and len(checkpoint.tensors[name].shape) == 2
        and checkpoint.tensors[name].dtype in FLOATING_DTYPES
    }
    layer_types = text.get("layer_types") or []
    full = {i for i, kind in enumerate(layer_types) if kind == FULL}
    return Layout(source_names, quantizable, text.get("num_hidden_layers", len(layer_types)), full)
