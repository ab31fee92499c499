"""Image, video and audio soft tokens into the prompt's embeddings, as `Gemma4UnifiedModel.forward` places them.

The processor writes one placeholder token per soft token (`<|image|>`, `<|video|>`, `<|audio|>`); each run of
placeholders is filled, in order, with the projected patches or audio frames. Vision runs (an image, a video frame)
also become blocks that attend to themselves both ways (see attention_mask.py).
"""

import re
from typing import Optional

import mlx.core as mx
import numpy as np

from .attention_mask import VISION_TOKEN_TYPES, vision_block_ids
from .errors import Gemma4Error

PADDING_POSITION = -1


def merge_media(
    model,
    input_ids,
    embeddings: mx.array,
    pixel_values=None,
    image_position_ids=None,
    pixel_values_videos=None,
    video_position_ids=None,
    num_frames_per_video=None,
    input_features=None,
    input_features_mask=None,
) -> mx.array:
    """`embeddings` (batch, length, hidden) of `input_ids` with every media placeholder replaced by its soft token.

    `num_frames_per_video` only splits the reference's per-video outputs, which are concatenated again before
    they are placed, so the order of frames is all that matters here.
    """
    ids = np.asarray(input_ids)
    config = model.config
    if pixel_values is not None:
        features = vision_soft_tokens(model, pixel_values, image_position_ids, "image")
        embeddings = scatter(embeddings, ids == config.image_token_id, features, "image")
    if pixel_values_videos is not None:
        features = vision_soft_tokens(model, pixel_values_videos, video_position_ids, "video")
        embeddings = scatter(embeddings, ids == config.video_token_id, features, "video")
    # The reference merges audio only when the mask comes with the features.
    if input_features is not None and input_features_mask is not None:
        features = audio_soft_tokens(model, input_features, input_features_mask)
        embeddings = scatter(embeddings, ids == config.audio_token_id, features, "audio")
    return embeddings


def vision_soft_tokens(model, pixel_values, position_ids, kind: str) -> mx.array:
    """(valid patches, hidden): the projected patches of every image (or video frame), padding dropped.

    Every step of the embedder acts on one patch at a time, so padding is dropped before it runs rather than after
    as in the reference: same numbers, less work."""
    if getattr(model, "vision_embedder", None) is None:
        raise Gemma4Error(f"this model has no vision embedder, so it cannot take a{'n' if kind == 'image' else ''} "
                          f"{kind}")
    if position_ids is None:
        raise Gemma4Error(f"{kind} pixels came without their patch positions")
    positions = np.asarray(position_ids)
    valid = np.flatnonzero(np.all(positions != PADDING_POSITION, axis=-1))
    pixels = mx.array(pixel_values)
    patches = pixels.reshape(-1, pixels.shape[-1])[mx.array(valid)]
    hidden = model.vision_embedder(patches[None], mx.array(positions.reshape(-1, 2)[valid])[None])
    return model.embed_vision(hidden)[0]


def audio_soft_tokens(model, input_features, input_features_mask) -> mx.array:
    """(valid frames, hidden): each 640-sample frame projected straight into the decoder's space."""
    if getattr(model, "embed_audio", None) is None:
        raise Gemma4Error("this model has no audio embedder, so it cannot take audio")
    frames = mx.array(input_features)
    valid = np.flatnonzero(np.asarray(input_features_mask).reshape(-1))
    return model.embed_audio(frames.reshape(-1, frames.shape[-1])[mx.array(valid)])


def scatter(embeddings: mx.array, placeholders: np.ndarray, features: mx.array, kind: str) -> mx.array:
    """Fills the placeholder positions, in reading order, with `features` (as torch's `masked_scatter`)."""
    count = int(placeholders.sum())
    if count != features.shape[0]:
        raise Gemma4Error(f"the prompt has {count} {kind} placeholder tokens but the {kind} inputs give "
                          f"{features.shape[0]} soft tokens")
    if count == 0:
        return embeddings
    order = np.clip(np.cumsum(placeholders.reshape(-1)) - 1, 0, None).reshape(placeholders.shape)
    spread = features.astype(embeddings.dtype)[mx.array(order)]
    return mx.where(mx.array(placeholders)[..., None], spread, embeddings)


def block_ids_for(config, mm_token_type_ids) -> Optional[mx.array]:
    """Vision block ids for the attention masks, or None (all causal). Like the reference, blocks exist only
    when the prompt says which tokens are media (`mm_token_type_ids`) and the config asks for vision attention."""
    if mm_token_type_ids is None or config.text_config.use_bidirectional_attention != "vision":
        return None
    types = np.asarray(mm_token_type_ids)
    if not np.isin(types, VISION_TOKEN_TYPES).any():
        return None  # text and audio only: plain causal masks, no mask arrays to build
    return vision_block_ids(mx.array(types))


def expand_media(processor, text: str, images=None, audio=None, videos=None) -> tuple:
    """`text` with every media placeholder expanded to its item's soft tokens, and the media arrays (numpy, under
    the reference's names). One pass over the text, as the reference's get_text_with_replacements: expansions
    themselves repeat the placeholder tokens and must not be expanded again."""
    config = processor.config
    token = processor.tokenizer.convert_ids_to_tokens
    begin_image, end_image = token(config.boi_token_id), token(config.eoi_token_id)
    placeholders = {
        "image": token(config.image_token_id), "video": token(config.video_token_id),
        "audio": token(config.audio_token_id),
    }
    replacements = {kind: [] for kind in placeholders}
    media = {}
    if images:
        from .image_processing import process_images

        processed = process_images(images, processor.image_budget)
        replacements["image"] = [begin_image + placeholders["image"] * count + end_image
                                 for count in processed.pop("num_soft_tokens_per_image")]
        media.update(processed)
    if videos:
        from .video_processing import process_videos

        processed = process_videos(videos, processor.video_budget)
        counts, stamps_per_video = processed.pop("num_soft_tokens_per_video"), processed.pop("timestamps_per_video")
        # Each frame: its mm:ss time, then its soft tokens between the image begin/end tokens.
        replacements["video"] = [
            " ".join(f"{stamp} {begin_image}{placeholders['video'] * count}{end_image}" for stamp in stamps)
            for count, stamps in zip(counts, stamps_per_video)
        ]
        media.update(processed)
    if audio:
        from .audio_processing import process_audio

        processed = process_audio(audio)
        begin_audio, end_audio = token(config.boa_token_id), token(config.eoa_token_index)
        replacements["audio"] = [begin_audio + placeholders["audio"] * int(count) + end_audio
                                 for count in processed["input_features_mask"].sum(axis=-1)]
        media.update(processed)
    return expand_placeholders(text, placeholders, replacements), media


def expand_placeholders(text: str, placeholders: dict, replacements: dict) -> str:
    """Kinds without inputs are left as they are, as the reference leaves them (they embed as pad)."""
    placeholders = {kind: placeholder for kind, placeholder in placeholders.items() if replacements[kind]}
    if not placeholders:
        return text
    for kind, placeholder in placeholders.items():
        found, given = text.count(placeholder), len(replacements[kind])
        if found != given:
            raise Gemma4Error(f"the prompt has {found} {placeholder} placeholder(s) for {given} {kind} input(s)")
    pattern = "|".join(re.escape(placeholder) for placeholder in placeholders.values())
    kinds = {placeholder: kind for kind, placeholder in placeholders.items()}
    queues = {kind: iter(items) for kind, items in replacements.items()}
    return re.sub(pattern, lambda match: next(queues[kinds[match.group(0)]]), text)


def media_prompt(model, processor, prompt, images=None, audio=None, video=None) -> tuple:
    """(token ids, generate_step's media arguments) for a text prompt holding one placeholder per image, audio
    clip and video. The embeddings are built for the whole prompt at once; chunked prefill then walks them, never
    cutting a vision block (generation.prefill_chunks)."""
    if not isinstance(prompt, str):
        raise Gemma4Error("a prompt with images, audio or video must be text with a placeholder for each")
    inputs = processor(prompt, images=images, audio=audio, videos=None if video is None else [video])
    input_ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    block_ids = block_ids_for(model.config, inputs.pop("mm_token_type_ids", None))
    embeddings = model.embed_inputs(input_ids, **inputs)
    return input_ids[0].tolist(), {"input_embeddings": embeddings, "block_ids": block_ids}
