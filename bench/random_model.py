"""Random-weight Gemma 4 unified models of named shapes, built directly in the benchmark's precision.

`12b` is the real 12B architecture; the smaller shapes keep its layer pattern (five sliding layers, then one full
layer with k_eq_v and one wide kv head) so that CPU runs and long-context runs exercise the same code paths.
Weights are made one decoder layer at a time and cast (or quantized) before the next is made, so a 4-bit 12B never
holds a bfloat16 copy of itself: the peak is the final model plus one layer (or one embedding slice) in float32.
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_gemma4.config import FULL, SLIDING, ModelConfig
from mlx_gemma4.decoder import checkpoint_weights, fuse_projections
from mlx_gemma4.quantized_layers import use_few_row_products
from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.model import Model

SLIDING_LAYERS_PER_FULL = 5
GROUP_SIZE = 64
# Rows of the embedding table made (and quantized) at a time: 16K x 3840 float32 is 250 MB.
EMBEDDING_SLICE_ROWS = 16_384
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, global_head_dim=32, vocab_size=1024, sliding_window=32),
    "small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, global_head_dim=128, vocab_size=32_768, sliding_window=512),
    "medium": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=256, global_head_dim=512, vocab_size=262_144,
                   sliding_window=1024),
    "12b": dict(hidden_size=3840, intermediate_size=15_360, num_hidden_layers=48, num_attention_heads=16,
                num_key_value_heads=8, head_dim=256, global_head_dim=512, vocab_size=262_144, sliding_window=1024),
}
DTYPES = {16: mx.bfloat16, 32: mx.float32}
# Multimodal token ids sit at the top of each shape's vocabulary, as the real ones sit in the 12B's.
MULTIMODAL_TOKENS = ("boi_token_id", "eoi_token_id", "image_token_id", "video_token_id", "boa_token_id",
                     "eoa_token_index", "audio_token_id")


def config_dict(shape: str, bits: int) -> dict:
    """config.json contents of a random model: the HF layout, with layer kinds written out so every reader (ours,
    mlx-lm, mlx-vlm, whose defaults differ) builds the same layers, and an mlx-style quantization block."""
    if shape not in SHAPES:
        raise Gemma4Error(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    if bits not in (4, 8, 16, 32):
        raise Gemma4Error("bits must be 4, 8, 16 (bfloat16) or 32 (float32)")
    text = dict(SHAPES[shape])
    layers = text["num_hidden_layers"]
    text.update(
        model_type="gemma4_unified_text",
        layer_types=[FULL if (i + 1) % (SLIDING_LAYERS_PER_FULL + 1) == 0 else SLIDING for i in range(layers)],
        num_global_key_value_heads=1, attention_k_eq_v=True, final_logit_softcapping=30.0,
        tie_word_embeddings=True, max_position_embeddings=262_144, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                         FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                "rope_theta": 1_000_000.0}},
        # mlx-lm's gemma4_text defaults are the small Gemma 4 models' (kv sharing, per-layer inputs): say no.
        num_kv_shared_layers=0, hidden_size_per_layer_input=0, use_double_wide_mlp=False, enable_moe_block=False,
        rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    vocab, hidden = text["vocab_size"], text["hidden_size"]
    config = dict(
        model_type="gemma4_unified", vocab_size=vocab, hidden_size=hidden, tie_word_embeddings=True,
        text_config=text, eos_token_id=[1],
        vision_config=dict(mm_embed_dim=hidden, output_proj_dims=hidden, patch_size=16, pooling_kernel_size=3,
                           mm_posemb_size=1120, rms_norm_eps=1e-6),
        audio_config=dict(audio_embed_dim=640, rms_norm_eps=1e-6),
        **{name: vocab - 1 - i for i, name in enumerate(MULTIMODAL_TOKENS)},
    )
    if bits < 16:
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    return config


def divides_into_groups(width: int) -> bool:
    """The converter's rule (and mlx-lm's): only layers whose input width is a multiple of the group size are
    quantized; the others stay in the unquantized dtype, and loaders tell them apart by their missing scales."""
    return width % GROUP_SIZE == 0


def random_embedding(vocab: int, hidden: int, bits: int) -> nn.Module:
    dtype = DTYPES.get(bits, mx.bfloat16)
    quantized = bits < 16 and divides_into_groups(hidden)
    pieces = []
    for start in range(0, vocab, EMBEDDING_SLICE_ROWS):
        # Cast before quantizing: scales and biases take the input's dtype, and float32 ones would make the
        # embedding hand float32 activations to the whole decoder (a real bf16 checkpoint converts to bf16 scales).
        rows = mx.random.normal((min(EMBEDDING_SLICE_ROWS, vocab - start), hidden), scale=hidden**-0.5).astype(dtype)
        piece = mx.quantize(rows, GROUP_SIZE, bits) if quantized else (rows,)
        mx.eval(piece)
        pieces.append(piece)
    parts = [mx.concatenate(column) for column in zip(*pieces)]
    if not quantized:
        embedding = nn.Embedding(1, hidden)
        embedding.weight = parts[0]
        return embedding
    embedding = nn.QuantizedEmbedding(1, hidden, GROUP_SIZE, bits)
    embedding.weight, embedding.scales, embedding.biases = parts
    embedding.num_embeddings = vocab
    return embedding


def finish_module(module: nn.Module, bits: int):
    """Cast (and at 4/8 bits quantize) one module's random weights, then make them, so its float32 originals go."""
    module.set_dtype(DTYPES.get(bits, mx.bfloat16))
    if bits < 16:
        nn.quantize(module, GROUP_SIZE, bits,
                    class_predicate=lambda _, layer: hasattr(layer, "to_quantized")
                    and divides_into_groups(layer.weight.shape[-1]))
    mx.eval(module.parameters())


def build_random_model(shape: str, bits: int, seed: int = 0):
    """(model, config dict). At 4/8 bits the decoder and the tied embedding/LM head are quantized with group size
    64, as mlx-lm and mlx-vlm convert; the vision and audio projections stay in bfloat16, as they do there."""
    config = config_dict(shape, bits)
    mx.random.seed(seed)
    model_config = ModelConfig.from_dict(config)
    model_config.quantization = config.get("quantization")
    model = Model(model_config)  # parameters are lazy: nothing is allocated until a module is evaluated
    text = model.language_model.model
    text.embed_tokens = random_embedding(config["vocab_size"], config["hidden_size"], bits)
    for layer in text.layers:
        finish_module(layer, bits)
    text.norm.set_dtype(DTYPES.get(bits, mx.bfloat16))
    for name in ("vision_embedder", "embed_vision", "embed_audio"):
        if hasattr(model, name):
            getattr(model, name).set_dtype(DTYPES.get(bits, mx.bfloat16))
    mx.eval(model.parameters())
    fuse_projections(model)  # as load_model does: the benchmark times the model users load
    use_few_row_products(model)
    model.eval()
    return model, config


def peer_readable_config(config: dict, model) -> dict:
    """A checkpoint's config.json with every field the peers would otherwise default differently written out (mlx-lm's
    gemma4 defaults to the small Gemma 4 models: kv sharing, per-layer inputs, a 4:1 layer pattern)."""
    text = model.config.text_config
    text_config = dict(config.get("text_config") or config)
    text_config.update(
        layer_types=list(text.layer_types), num_kv_shared_layers=text.num_kv_shared_layers,
        hidden_size_per_layer_input=0, use_double_wide_mlp=text.use_double_wide_mlp, enable_moe_block=False,
        vocab_size=text.vocab_size, final_logit_softcapping=text.final_logit_softcapping,
    )
    if FULL in text.layer_types:  # HF configs may give these per layer only; the peers read the global fields
        full = text.layer_types.index(FULL)
        text_config.update(global_head_dim=text.layer_head_dims[full],
                           num_global_key_value_heads=text.layer_kv_heads[full])
    readable = dict(config, text_config=text_config, vocab_size=text.vocab_size, model_type="gemma4_unified")
    if model.config.quantization:
        readable["quantization"] = model.config.quantization
    return readable


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: the whole decoder and the (tied) LM head; the embedding lookup and
    the vision/audio projections touch next to nothing."""
    return sum(v.nbytes for _, v in tree_flatten(model.language_model.parameters()))


def parameter_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def save_converted(model, config: dict, folder: Path, shard_bytes: int = 2 << 30):
    """Write the weights in the converted-MLX layout (`language_model.model.*`, ..., gate and up projections apart)
    with config.json and an index: the folder mlx-lm's and mlx-vlm's loaders read, so the peers run on exactly these
    weights."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, value in checkpoint_weights(model).items():
        if size + value.nbytes > shard_bytes and current:
            shards.append(current)
            current, size = {}, 0
        current[name] = value
        size += value.nbytes
    shards.append(current)
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / file_name), shard, metadata={"format": "mlx"})
        weight_map.update({name: file_name for name in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=1))


# The 12B assistant's real config is not available offline: four layers (three sliding, one full) at a quarter of the
# target's width, with the centroid-masked head Google's assistants use, is the assumed stand-in.
ASSISTANT_LAYERS = [SLIDING, SLIDING, SLIDING, FULL]
ASSISTANT_CENTROIDS = 2048
ASSISTANT_CENTROID_TOP_K = 32


def assistant_config_dict(target_config: dict) -> dict:
    text = target_config["text_config"]
    hidden = max(32, text["hidden_size"] // 4)
    ordered = text["vocab_size"] % ASSISTANT_CENTROIDS == 0 and text["vocab_size"] > 16 * ASSISTANT_CENTROIDS
    config = dict(
        model_type="gemma4_unified_assistant", backbone_hidden_size=text["hidden_size"],
        use_ordered_embeddings=ordered, num_centroids=ASSISTANT_CENTROIDS,
        centroid_intermediate_top_k=ASSISTANT_CENTROID_TOP_K, tie_word_embeddings=True,
        text_config=dict(
            text, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=len(ASSISTANT_LAYERS),
            layer_types=list(ASSISTANT_LAYERS), num_kv_shared_layers=len(ASSISTANT_LAYERS),
        ),
    )
    if "quantization" in target_config:
        config["quantization"] = target_config["quantization"]
    return config


def build_random_assistant(target_config: dict, bits: int, seed: int = 1):
    """A random drafter that fits the random target (width, vocabulary, head sizes), in the same precision."""
    from mlx_gemma4.drafter import AssistantConfig, Drafter

    config = assistant_config_dict(target_config)
    mx.random.seed(seed)
    drafter = Drafter(AssistantConfig.from_dict(config))
    vocab, hidden = config["text_config"]["vocab_size"], config["text_config"]["hidden_size"]
    drafter.model.embed_tokens = random_embedding(vocab, hidden, bits)
    if config["use_ordered_embeddings"]:
        drafter.masked_embedding.token_ordering = mx.random.permutation(vocab).astype(mx.int32)
    for name in ("model", "pre_projection", "post_projection", "masked_embedding"):
        module = getattr(drafter, name, None)
        if module is None:
            continue
        if name == "model":
            for layer in module.layers:
                finish_module(layer, bits)
            module.norm.set_dtype(DTYPES.get(bits, mx.bfloat16))
        else:
            finish_module(module, bits)
    mx.eval(drafter.parameters())
    fuse_projections(drafter)
    use_few_row_products(drafter)
    drafter.eval()
    return drafter
