"""Size of a converted Gemma 4 unified model, computed from its config alone (no weights needed).

    python bench/studies/quantized_size.py [--config config.json]

Without --config it uses the 12B's shape: hidden 3840, 48 layers (5 sliding : 1 full), 16 query heads, 8 KV heads
of 256 on sliding layers, 1 KV head of 512 with K = V on full layers, MLP 15360, vocabulary 262144, tied
embeddings, the 48x48x3 -> 3840 vision embedder with a 1120x2x3840 position table and the 640 -> 3840 audio one.
Unquantized tensors, scales and biases are counted in bfloat16, as the converter writes them for a bf16 source.
"""

import argparse
import json
import sys
from math import prod
from pathlib import Path

from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from convert.layout import model_layout  # noqa: E402
from convert.quantize import QuantizationSettings, plan_quantization  # noqa: E402
from mlx_gemma4.config import ModelConfig  # noqa: E402
from mlx_gemma4.model import Model  # noqa: E402

BF16_BYTES = 2
GEMMA_4_12B = dict(
    model_type="gemma4_unified",
    text_config=dict(
        hidden_size=3840, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
        global_head_dim=512, num_global_key_value_heads=1, attention_k_eq_v=True, intermediate_size=15360,
        vocab_size=262144, tie_word_embeddings=True,
    ),
    vision_config=dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=3840, mm_posemb_size=1120,
                       output_proj_dims=3840),
    audio_config=dict(audio_embed_dim=640),
)


def tensor_bytes(shape, params) -> int:
    if params is None:
        return prod(shape) * BF16_BYTES
    rows, columns = prod(shape[:-1]), shape[-1]
    return rows * columns * params["bits"] // 8 + 2 * rows * (columns // params["group_size"]) * BF16_BYTES


def sizes(model: Model, settings) -> dict:
    layout = model_layout(model, {})
    plan = plan_quantization(layout, settings) if settings else {}
    parts = {}
    for name, value in tree_flatten(model.parameters()):
        part = "text" if name.startswith("language_model.") else name.split(".")[0]
        params = plan.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        parts[part] = parts.get(part, 0) + tensor_bytes(value.shape, params)
    return parts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a config.json (default: Gemma 4 12B unified)")
    args = parser.parse_args()
    config = json.loads(args.config.read_text()) if args.config else GEMMA_4_12B
    model = Model(ModelConfig.from_dict(config))  # lazy parameters: shapes only, no memory
    parameters = sum(value.size for _, value in tree_flatten(model.parameters()))
    print(f"{parameters / 1e9:.3f} B parameters")
    rows = {
        "bfloat16 (unquantized)": None,
        "8-bit g64": QuantizationSettings(bits=8),
        "4-bit g64 (-q)": QuantizationSettings(),
        "4-bit g32 (--qat)": QuantizationSettings(group_size=32),
        "mixed_4_8 (--quant-predicate)": QuantizationSettings(recipe="mixed_4_8"),
    }
    print(f"{'weights':32s} {'total GB':>9s} {'GiB':>7s} {'bits/w':>7s}   parts (GB)")
    for label, settings in rows.items():
        parts = sizes(model, settings)
        total = sum(parts.values())
        detail = ", ".join(f"{k} {v / 1e9:.3f}" for k, v in parts.items())
        print(f"{label:32s} {total / 1e9:9.3f} {total / 2**30:7.3f} {8 * total / parameters:7.3f}   {detail}")


if __name__ == "__main__":
    main()
