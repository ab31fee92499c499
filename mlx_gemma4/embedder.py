"""The encoder-free projection embedder: raw 48x48 image patches and raw 640-sample audio frames straight into the
decoder's embedding space (`Gemma4UnifiedVisionEmbedder`, `Gemma4UnifiedMultimodalEmbedder` in the reference)."""

import math

import mlx.core as mx
import mlx.nn as nn

from .config import AudioConfig, VisionConfig
from .decoder import rms_norm_without_scale

# A patch row is 48*48*3 = 6912 values. MLX's CPU kernels sum a row that long in one float32 run and lose ~1e-5
# (torch ~1e-6), which moved image prompts' logits past 1e-4 of the reference; summing pairwise (the norm) or in
# partial runs (the projection) keeps the reference's precision at little cost.
PATCH_REDUCTION_RUNS = 16


def partial_runs(width: int) -> int:
    return math.gcd(width, PATCH_REDUCTION_RUNS)


def precise_mean(x: mx.array) -> mx.array:
    """Pairwise summation: halve the row by adding neighbours while its width is even (6912 = 2**8 * 27)."""
    width = x.shape[-1]
    while x.shape[-1] % 2 == 0:
        x = x.reshape(*x.shape[:-1], -1, 2).sum(-1)
    return x.sum(-1, keepdims=True) / width


def precise_layer_norm(x: mx.array, norm: nn.LayerNorm) -> mx.array:
    # Pixel rows are mostly their mean, and a flat patch's variance is near or below eps, where any rounding of the
    # mean is multiplied by up to 1/sqrt(eps) ~ 316. Centering the offsets from the row's first value (small, and
    # exact to compute) never rounds a large mean.
    offsets = x - x[..., :1]
    centered = offsets - precise_mean(offsets)
    return centered * mx.rsqrt(precise_mean(centered * centered) + norm.eps) * norm.weight + norm.bias


def precise_linear(x: mx.array, linear: nn.Module) -> mx.array:
    if not isinstance(linear, nn.Linear):  # quantized: its kernel decides the summation
        return linear(x)
    *batch, width = x.shape
    runs = partial_runs(width)
    inputs = x.reshape(-1, runs, width // runs).transpose(1, 0, 2)
    weights = linear.weight.reshape(-1, runs, width // runs).transpose(1, 2, 0)
    out = (inputs @ weights).sum(0)
    if "bias" in linear:
        out = out + linear.bias
    return out.reshape(*batch, -1)


class MultimodalEmbedder(nn.Module):
    """RMSNorm without scale, then a linear map to the text hidden size."""

    def __init__(self, input_dims: int, text_hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(input_dims, text_hidden_size, bias=False)

    def __call__(self, x):
        return self.embedding_projection(rms_norm_without_scale(x, self.eps))


class VisionEmbedder(nn.Module):
    """Patch LayerNorm, dense, LayerNorm, plus a factorized 2D position table, then LayerNorm.

    Weights live under `vision_embedder.*`; the final projection is the separate `embed_vision` MultimodalEmbedder,
    the names the reference checkpoints and mlx-vlm use.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        patch_dims = config.model_patch_size**2 * 3
        self.patch_ln1 = nn.LayerNorm(patch_dims)
        self.patch_dense = nn.Linear(patch_dims, config.mm_embed_dim)
        self.patch_ln2 = nn.LayerNorm(config.mm_embed_dim)
        self.pos_embedding = mx.zeros((config.mm_posemb_size, 2, config.mm_embed_dim))
        self.pos_norm = nn.LayerNorm(config.mm_embed_dim)

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        """pixel_values (images, patches, 48*48*3); position_ids (images, patches, 2) as (x, y), -1 for padding."""
        pixel_values = pixel_values.astype(self.patch_ln1.weight.dtype)
        hidden = self.patch_ln2(precise_linear(precise_layer_norm(pixel_values, self.patch_ln1), self.patch_dense))
        clamped = mx.maximum(position_ids, 0)
        valid = (position_ids != -1).astype(self.pos_embedding.dtype)[..., None]
        x_table = self.pos_embedding[:, 0]
        y_table = self.pos_embedding[:, 1]
        positions = x_table[clamped[..., 0]] * valid[..., 0, :] + y_table[clamped[..., 1]] * valid[..., 1, :]
        return self.pos_norm(hidden + positions)


def make_embedders(vision: VisionConfig, audio: AudioConfig, text_hidden_size: int) -> dict:
    embedders = {}
    if vision is not None:
        embedders["vision_embedder"] = VisionEmbedder(vision)
        embedders["embed_vision"] = MultimodalEmbedder(vision.output_proj_dims, text_hidden_size, vision.rms_norm_eps)
    if audio is not None:
        embedders["embed_audio"] = MultimodalEmbedder(audio.audio_embed_dim, text_hidden_size, audio.rms_norm_eps)
    return embedders
