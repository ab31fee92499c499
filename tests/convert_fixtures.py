"""Tiny multi-shard reference checkpoints sized for quantization: every matrix width a multiple of 64, so that the
group-size rule quantizes each Linear and Embedding, in several safetensors shards with an index."""

import json
import sys
from pathlib import Path

from reference_models import randomize, save_tokenizer, special_token_ids, text_config

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))  # the `convert` package lives beside `mlx_gemma4`, not installed

QUANTIZABLE_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    global_head_dim=32, vocab_size=389,
)
QUANTIZABLE_VISION = dict(mm_embed_dim=64, output_proj_dims=64, mm_posemb_size=24)
SHARD_SIZE = "500KB"


def save_quantizable_checkpoint(folder: Path, seed: int = 0, shard_size: str = SHARD_SIZE):
    """A random Gemma4UnifiedForConditionalGeneration (text, vision, audio) saved in several shards; returns it."""
    import torch
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    folder = Path(folder)
    save_tokenizer(folder, QUANTIZABLE_TEXT["vocab_size"])
    ids = special_token_ids(folder)
    torch.manual_seed(seed)
    config = Gemma4UnifiedConfig(
        text_config=text_config(
            **QUANTIZABLE_TEXT, pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"]
        ),
        vision_config=QUANTIZABLE_VISION,
        audio_config=dict(audio_embed_dim=640),
        boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"], image_token_id=ids["<|image|>"],
        boa_token_id=ids["<|audio>"], eoa_token_index=ids["<audio|>"], audio_token_id=ids["<|audio|>"],
        video_token_id=ids["<|video|>"],
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    model = Gemma4UnifiedForConditionalGeneration(config).eval()
    randomize(model, seed)
    model.save_pretrained(str(folder), max_shard_size=shard_size)
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [ids["<eos>"], ids["<turn|>"]], "bos_token_id": ids["<bos>"]})
    )
    return model


def save_assistant_checkpoint(folder: Path, seed: int = 0):
    """A random Gemma4UnifiedAssistantForCausalLM (every layer reusing the target's KV) with ordered embeddings,
    every matrix width a multiple of 64."""
    from speculative_fixtures import save_reference_assistant

    sizes = {k: v for k, v in QUANTIZABLE_TEXT.items() if k != "vocab_size"}
    return save_reference_assistant(
        folder, seed=seed, ordered=True, num_centroids=8, top_k=2, backbone=QUANTIZABLE_TEXT["hidden_size"],
        vocab_size=384, **sizes,
    )
