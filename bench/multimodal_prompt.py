"""Synthetic image and audio prompts for multimodal time to first token: a prompt whose placeholders are filled by
the model's own projection embedders, so the timing covers patch/frame embedding plus the prefill, as a real
image or clip of that many soft tokens would (decoding and resizing files is the processor's cost, not the model's).
"""

import math

import mlx.core as mx
import numpy as np

from peers import PREFILL_STEP_SIZE, Runtime

AUDIO_TOKENS_PER_SECOND = 25  # one soft token per 40 ms frame
PATCH_PIXELS = 48 * 48 * 3
TEXT_TOKENS = 16
IMAGE_TYPE, AUDIO_TYPE = 1, 3


def media_prompt(config, image_tokens: int = 0, audio_seconds: float = 0.0, seed: int = 0) -> dict:
    """Token ids with the media runs in place, the media arrays under the reference's names, and the token types."""
    rng = np.random.default_rng(seed)
    text = list(rng.integers(16, min(config.boi_token_id, config.text_config.vocab_size // 2), TEXT_TOKENS))
    ids, types, inputs = [2] + text[: TEXT_TOKENS // 2], [], {}
    if image_tokens:
        side = math.ceil(math.sqrt(image_tokens))
        positions = np.array([(i % side, i // side) for i in range(image_tokens)], dtype=np.int32)[None]
        inputs.update(pixel_values=rng.random((1, image_tokens, PATCH_PIXELS), dtype=np.float32),
                      image_position_ids=positions)
        ids += [config.boi_token_id] + [config.image_token_id] * image_tokens + [config.eoi_token_id]
    audio_tokens = int(audio_seconds * AUDIO_TOKENS_PER_SECOND)
    if audio_tokens:
        inputs.update(input_features=rng.standard_normal((1, audio_tokens, 640)).astype(np.float32),
                      input_features_mask=np.ones((1, audio_tokens), dtype=bool))
        ids += [config.boa_token_id] + [config.audio_token_id] * audio_tokens + [config.eoa_token_index]
    ids += text[TEXT_TOKENS // 2:]
    types = np.array([[IMAGE_TYPE if t == config.image_token_id else AUDIO_TYPE if t == config.audio_token_id else 0
                       for t in ids]])
    return {"ids": [int(t) for t in ids], "inputs": inputs, "mm_token_type_ids": types,
            "image_tokens": image_tokens, "audio_tokens": audio_tokens}


def multimodal_runtime(model, prompt: dict) -> Runtime:
    """Ours, with the media embedded inside the timed region (the steps generator runs it before the prefill)."""
    from mlx_gemma4.decoding import generate_step
    from mlx_gemma4.multimodal import block_ids_for, merge_media

    def steps(ids: list, max_tokens: int, cache: list):
        input_ids = mx.array(ids)[None]
        embeddings = merge_media(model, np.array([ids]), model.embed_inputs(input_ids), **prompt["inputs"])
        block_ids = block_ids_for(model.config, prompt["mm_token_type_ids"])
        yield from generate_step(input_ids[0], model, max_tokens=max_tokens, prompt_cache=cache,
                                 prefill_step_size=PREFILL_STEP_SIZE, input_embeddings=embeddings,
                                 block_ids=block_ids)

    return Runtime("ours", model, steps, model.make_cache)


def label(prompt: dict) -> str:
    parts = []
    if prompt["image_tokens"]:
        parts.append(f"image {prompt['image_tokens']} tokens")
    if prompt["audio_tokens"]:
        parts.append(f"audio {prompt['audio_tokens']} tokens")
    return " + ".join(parts) + f", prompt {len(prompt['ids'])}"
