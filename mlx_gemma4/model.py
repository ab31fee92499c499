"""The whole Gemma 4 unified model: projection embedders, decoder and LM head.

Parameter names follow the converted-MLX layout that mlx-lm and mlx-vlm also read (`language_model.model.*`,
`vision_embedder.*`, `embed_vision.*`, `embed_audio.*`); `sanitize` maps Hugging Face names onto them.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .decode_step import CompiledSteps
from .decoder import LanguageModel
from .embedder import make_embedders
from .errors import Gemma4Error
from .kv_cache import kv_quantization
from .multimodal import block_ids_for, merge_media

# Reference buffers that are recomputed, never loaded.
DERIVED_TENSORS = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq", "embed_scale")


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config.text_config)
        # decode_step.py's traces of the one-token step, replayed by every generation with this model.
        self.compiled_steps = CompiledSteps()
        for name, module in make_embedders(
            config.vision_config, config.audio_config, config.text_config.hidden_size
        ).items():
            setattr(self, name, module)

    def make_cache(self, kv_bits: Optional[int] = None, kv_group_size: int = 64, quantized_kv_start: int = 0) -> list:
        """The decoder's caches; with `kv_bits` (4 or 8) they hold keys and values quantized in groups of
        `kv_group_size` once they hold `quantized_kv_start` positions (mlx-lm's options)."""
        return self.language_model.model.make_cache(kv_quantization(kv_bits, kv_group_size, quantized_kv_start))

    def embed_inputs(self, input_ids: mx.array, **media) -> mx.array:
        """Token embeddings with image, video and audio soft tokens in place; `media` as the reference processor
        names its arrays (pixel_values, image_position_ids, input_features, ...)."""
        input_ids = mx.array(input_ids)
        # As the reference: media placeholders embed as the pad token until their features are scattered in.
        config = self.config
        placeholders = (config.image_token_id, config.video_token_id, config.audio_token_id)
        is_placeholder = mx.zeros(input_ids.shape, dtype=mx.bool_)
        for token_id in placeholders:
            is_placeholder = is_placeholder | (input_ids == token_id)
        ids = mx.where(is_placeholder, config.text_config.pad_token_id, input_ids)
        embeddings = self.language_model.model.embed(ids)
        return merge_media(self, input_ids, embeddings, **media) if media else embeddings

    def __call__(
        self,
        input_ids: Optional[mx.array] = None,
        cache: Optional[list] = None,
        input_embeddings: Optional[mx.array] = None,
        logits_to_keep: int = 0,
        block_ids: Optional[mx.array] = None,
        return_hidden: bool = False,
        mm_token_type_ids=None,
        attention_mask=None,
        **media,
    ) -> mx.array:
        """Logits (batch, length, vocab), as the reference's `.logits`; `logits_to_keep` > 0 keeps only the last ones.

        Takes the reference processor's output as it is: `mm_token_type_ids` turns on bidirectional attention within
        each image or video frame; `media` are its arrays: pixel_values, image_position_ids, pixel_values_videos,
        video_position_ids, num_frames_per_video, input_features, input_features_mask. Its `attention_mask` is
        accepted when it masks nothing: one unpadded prompt at a time."""
        if attention_mask is not None and not mx.array(attention_mask).all().item():
            raise Gemma4Error("padded prompts are not supported: pass one prompt without padding")
        if input_embeddings is None:
            input_embeddings = self.embed_inputs(input_ids, **media)
        if block_ids is None:
            block_ids = block_ids_for(self.config, mm_token_type_ids)
        hidden = self.language_model.model(input_embeddings, cache=cache, block_ids=block_ids)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.language_model.logits(hidden)
        # The assistant drafter reads the final-normed hidden states the logits come from.
        return (logits, hidden) if return_hidden else logits

    def sanitize(self, weights: dict) -> dict:
        """Hugging Face tensor names to ours; names already in our layout pass through."""
        tied = self.config.text_config.tie_word_embeddings
        # A text-only checkpoint (Gemma4UnifiedForCausalLM) keeps the decoder directly under `model.`.
        text_only = self.config.model_type == "gemma4_unified_text"
        renamed = {}
        for name, value in weights.items():
            if any(part in name for part in DERIVED_TENSORS):
                continue
            if name.startswith("model.language_model."):
                name = "language_model.model." + name[len("model.language_model."):]
            elif name.startswith("model."):
                name = ("language_model.model." if text_only else "") + name[len("model."):]
            if name == "lm_head.weight":
                if tied:
                    continue
                name = "language_model.lm_head.weight"
            renamed[name] = value
        return renamed
