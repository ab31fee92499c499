"""Image, video and audio soft tokens into the prompt's embeddings, as `Gemma4UnifiedModel.forward` places them.

The processor writes one placeholder token per soft token (`<|image|>`, `<|video|>`, `<|audio|>`); each run of
placeholders is filled, in order, with the projected patches or audio frames. Vision runs also become blocks that
attend to themselves both ways on sliding layers (see attention_mask.py).
"""

from typing import Optional

import mlx.core as mx
import numpy as np

from .attention_mask import vision_block_ids
from .errors import Gemma4Error

# The names the reference processor gives its arrays, and that Model.__call__ accepts.
MEDIA_INPUT_NAMES = (
    "pixel_values", "image_position_ids", "pixel_values_videos", "video_position_ids", "num_frames_per_video",
    "input_features", "input_features_mask",
)
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
    """Vision block ids for the sliding layers' mask, or None (all causal). Like the reference, blocks exist only
    when the prompt says which tokens are media (`mm_token_type_ids`) and the config asks for vision attention."""
    if mm_token_type_ids is None or config.text_config.use_bidirectional_attention != "vision":
        return None
    return vision_block_ids(mx.array(mm_token_type_ids))
