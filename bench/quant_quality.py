"""Quantization quality: KL divergence and top-1 agreement against the unquantized model, per recipe.

    python bench/quant_quality.py [--layers 12] [--hidden 256] [--prompts 8] [--length 64]

No real Gemma 4 weights are reachable offline, so the model is random but shaped like a trained one where it matters
to quantization: matrices with per-row scales spread log-normally and a few outlier input channels (the outlier
features trained transformers carry in their residual stream), embeddings with varied row norms, a 5:1
sliding/full layer pattern with K=V full layers. Every recipe is applied to the same float32 weights and scored on
the same fixed prompts (random token ids, fixed seed); the vision rows score the image soft tokens the same way.
"""

import argparse
import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

from convert import qat  # noqa: E402
from convert.recipes import RECIPES  # noqa: E402
from mlx_gemma4.config import ModelConfig  # noqa: E402
from mlx_gemma4.model import Model  # noqa: E402

OUTLIER_FRACTION = 0.02
OUTLIER_GAIN = 4.0
ROW_SCALE_SIGMA = 0.5
# Blocks add a fraction of the residual's size, as in trained models; 1.0 would make the random model chaotic.
POST_NORM_GAIN = 0.3
GROUP_SIZE = 64


def structured_model(hidden: int, layers: int, vocab: int, seed: int) -> Model:
    head_dim = hidden // 4
    config = ModelConfig.from_dict(dict(
        model_type="gemma4_unified",
        text_config=dict(
            hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=head_dim, global_head_dim=2 * head_dim, num_global_key_value_heads=1,
            attention_k_eq_v=True, vocab_size=vocab, sliding_window=128, final_logit_softcapping=30.0,
        ),
        vision_config=dict(mm_embed_dim=hidden, output_proj_dims=hidden, mm_posemb_size=64),
        audio_config=dict(audio_embed_dim=640),
    ))
    model = Model(config)
    rng = np.random.default_rng(seed)
    outliers = rng.choice(hidden, max(1, int(OUTLIER_FRACTION * hidden)), replace=False)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        shape = value.shape
        if name.endswith("layer_scalar"):
            array = rng.uniform(0.9, 1.1, shape)
        elif len(shape) == 1 and "norm" in name:
            array = 1.0 + 0.2 * rng.standard_normal(shape)
            if "post_" in name:
                array *= POST_NORM_GAIN
            elif shape[0] == hidden and "layernorm" in name:
                array[outliers] *= OUTLIER_GAIN / 2  # residual-stream outlier features, as trained models have
        elif len(shape) == 1:
            array = 0.02 * rng.standard_normal(shape)
        elif "embed_tokens" in name:
            array = rng.standard_normal(shape) * np.exp(0.3 * rng.standard_normal((shape[0], 1))) / math.sqrt(shape[1])
            array *= 1.5  # tied head: logits of a trained model span a few units
        else:
            fan_in = shape[-1]
            array = rng.standard_normal(shape) / math.sqrt(fan_in)
            array *= np.exp(ROW_SCALE_SIGMA * rng.standard_normal((*shape[:-1], 1)))
            if fan_in == hidden:
                array[..., outliers] *= OUTLIER_GAIN
        weights[name] = mx.array(array.astype(np.float32))
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def quantized_copy(model: Model, weights: list, predicate) -> Model:
    copy = Model(model.config)
    copy.load_weights(weights)
    nn.quantize(copy, group_size=GROUP_SIZE, bits=4, class_predicate=predicate)
    mx.eval(copy.parameters())
    return copy


def mlx_lm_rule(predicate):
    """mlx-lm's rule (Linear/Embedding with width divisible by the group) around a recipe's choice."""
    def wrapped(path, module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % GROUP_SIZE:
            return False
        return predicate(path)
    return wrapped


def only(substrings, bits=8, skip_vision=False):
    def predicate(path):
        if skip_vision and "vision_embedder" in path:
            return False
        if any(s in path for s in substrings):
            return {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
        return True
    return predicate


def score(reference: np.ndarray, logits: np.ndarray) -> tuple:
    """(mean KL(reference || quantized) in nats per token, top-1 agreement)."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    p, q = log_softmax(reference.astype(np.float64)), log_softmax(logits.astype(np.float64))
    kl = (np.exp(p) * (p - q)).sum(-1).mean()
    return kl, (reference.argmax(-1) == logits.argmax(-1)).mean()


def bits_per_weight(model: Model) -> float:
    quantized_bits, count = 0, 0
    for _, module in model.language_model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            n = module.weight.shape[0] * module.weight.shape[1] * 32 // module.bits
            quantized_bits += n * (module.bits + 32 / module.group_size)  # bf16 scale + bias per group
            count += n
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            quantized_bits += module.weight.size * 16
            count += module.weight.size
    return quantized_bits / count


def image_inputs(model: Model, tokens: mx.array, rng) -> tuple:
    """Embeddings with 16 image soft tokens after the first 8 text tokens, and the raw patches."""
    vision = model.config.vision_config
    patches = mx.array(rng.uniform(-1, 1, (tokens.shape[0], 16, vision.model_patch_size**2 * 3)).astype(np.float32))
    positions = mx.array(np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(1, 16, 2).repeat(
        tokens.shape[0], 0).astype(np.int32))
    return patches, positions


def image_logits(model: Model, tokens: mx.array, patches, positions) -> np.ndarray:
    soft = model.embed_vision(model.vision_embedder(patches, positions))
    text = model.embed_inputs(tokens)
    embeddings = mx.concatenate([text[:, :8], soft, text[:, 8:]], axis=1)
    return np.array(model(input_embeddings=embeddings))


def qat_rows(model: Model, weights: list, tokens) -> list:
    """Weights moved onto the q4_0 grid (QAT-like); exact mapping vs plain min/max 4-bit at groups 32 and 64."""
    snapped = [(k, qat.dequantize_q4_0(v) if v.ndim == 2 and v.shape[-1] % 32 == 0 and "pos_embedding" not in k
                else v) for k, v in weights]
    base = Model(model.config)
    base.load_weights(snapped)
    reference = np.array(base(tokens))
    rows = []
    for label, group in (("q4_0 QAT weights, plain min/max 4-bit g64", 64), ("  plain min/max 4-bit g32", 32)):
        copy = Model(model.config)
        copy.load_weights(snapped)
        nn.quantize(copy, group_size=group, bits=4,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group == 0)
        rows.append((label, *score(reference, np.array(copy(tokens))), None))
    exact = Model(model.config)
    exact.load_weights(snapped)
    nn.quantize(exact, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    mapped = {}
    for name, value in snapped:
        path = name.removesuffix(".weight")
        if value.ndim == 2 and value.shape[-1] % 32 == 0 and "pos_embedding" not in name:
            packed, scales, biases, _ = qat.quantize_on_grid(value)
            mapped.update({f"{path}.weight": packed, f"{path}.scales": scales, f"{path}.biases": biases})
    exact.load_weights(list(mapped.items()), strict=False)
    rows.append(("  --qat exact mapping (4-bit g32)", *score(reference, np.array(exact(tokens))), None))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = structured_model(args.hidden, args.layers, args.vocab, args.seed)
    weights = tree_flatten(model.parameters())
    rng = np.random.default_rng(args.seed + 1)
    tokens = mx.array(rng.integers(0, args.vocab, (args.prompts, args.length)).astype(np.int32))
    reference = np.array(model(tokens))
    patches, positions = image_inputs(model, tokens, rng)
    image_reference = image_logits(model, tokens, patches, positions)
    probabilities = np.exp(reference - reference.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    print(f"reference: mean top-1 probability {probabilities.max(-1).mean():.3f}, "
          f"{args.prompts} prompts x {args.length} tokens, {args.layers} layers, hidden {args.hidden}\n")

    candidates = {
        "4-bit g64 (default)": only([]),
        "8-bit g64": only([""], bits=8),
        "4-bit, embed_tokens (tied head) 8-bit": only(["embed_tokens"]),
        "4-bit, v_proj + full-layer k_proj (=V) 8-bit": only(["v_proj"] + [
            f"layers.{i}.self_attn.k_proj" for i in range(5, args.layers, 6)]),
        "4-bit, down_proj 8-bit": only(["down_proj"]),
        "4-bit, o_proj 8-bit": only(["o_proj"]),
        "4-bit, q_proj 8-bit": only(["q_proj"]),
        "4-bit, gate_proj + up_proj 8-bit": only(["gate_proj", "up_proj"]),
        "4-bit, full-attention layers 8-bit": only([f"layers.{i}." for i in range(5, args.layers, 6)]),
        "4-bit, first + last layer 8-bit": only(["layers.0.", f"layers.{args.layers - 1}."]),
        "4-bit, vision patch_dense unquantized": only([], skip_vision=True),
    }
    full_layers = {i for i, kind in enumerate(model.config.text_config.layer_types) if kind == "full_attention"}
    candidates.update({f"recipe {name}": recipe.build(full_layers, args.layers, GROUP_SIZE)
                       for name, recipe in RECIPES.items()})
    print(f"{'configuration':48s} {'KL text':>9s} {'top-1':>7s} {'KL image':>9s} {'top-1':>7s} {'bits/w':>7s}")
    for label, predicate in candidates.items():
        quantized = quantized_copy(model, weights, mlx_lm_rule(predicate))
        kl, top1 = score(reference, np.array(quantized(tokens)))
        image_kl, image_top1 = score(image_reference, image_logits(quantized, tokens, patches, positions))
        print(f"{label:48s} {kl:9.5f} {top1:7.3f} {image_kl:9.5f} {image_top1:7.3f} {bits_per_weight(quantized):7.3f}",
              flush=True)
    print()
    for label, kl, top1, _ in qat_rows(model, weights, tokens):
        print(f"{label:48s} {kl:9.5f} {top1:7.3f}", flush=True)


if __name__ == "__main__":
    main()
