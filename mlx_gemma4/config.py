"""Model configuration as dataclasses, built from a Hugging Face config.json dict.

Defaults and derived values follow `transformers/models/gemma4_unified/configuration_gemma4_unified.py`, so a
config.json that omits a field means what it means to the reference.
"""

from dataclasses import dataclass, field
from typing import Optional

from .errors import Gemma4Error

SLIDING = "sliding_attention"
FULL = "full_attention"

# The reference's pattern when config.json has no `layer_types`: five sliding layers, then one full layer.
DEFAULT_SLIDING_WINDOW_PATTERN = 6
DEFAULT_ROPE_PARAMETERS = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
DEFAULT_GLOBAL_HEAD_DIM = 512
SUPPORTED_ROPE_TYPES = ("default", "proportional")
PER_LAYER_OVERRIDES = ("head_dim", "num_key_value_heads")


@dataclass
class TextConfig:
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    vocab_size: int = 262_144
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 262_144
    rms_norm_eps: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: list = field(default_factory=lambda: [1])
    bos_token_id: Optional[int] = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict = field(default_factory=lambda: dict(DEFAULT_ROPE_PARAMETERS))
    attention_bias: bool = False
    sliding_window: int = 1024
    layer_types: list = field(default_factory=list)
    final_logit_softcapping: Optional[float] = None
    use_bidirectional_attention: Optional[str] = "vision"
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    # Resolved per layer from `per_layer_config` (or `global_head_dim` / `num_global_key_value_heads`).
    layer_head_dims: list = field(default_factory=list)
    layer_kv_heads: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, params: dict) -> "TextConfig":
        known = {name for name in cls.__dataclass_fields__ if not name.startswith("layer_")}
        config = cls(**{k: v for k, v in params.items() if k in known})
        config.layer_types = list(params.get("layer_types") or [])
        config._resolve(params)
        return config

    def _resolve(self, params: dict):
        if self.use_bidirectional_attention == "all":
            raise Gemma4Error("use_bidirectional_attention='all' is an encoder setting; this runtime generates text")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu"):
            raise Gemma4Error(f"unsupported hidden_activation {self.hidden_activation!r}")
        if not self.layer_types:
            self.layer_types = [
                SLIDING if (i + 1) % DEFAULT_SLIDING_WINDOW_PATTERN else FULL for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise Gemma4Error("config: layer_types must name one kind per layer")
        # The reference forces the last layer to full attention whatever the config says.
        self.layer_types[-1] = FULL
        for rope in self.rope_parameters.values():
            if rope and rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
                raise Gemma4Error(f"unsupported rope_type {rope.get('rope_type')!r}")

        self.layer_head_dims = [self.head_dim] * self.num_hidden_layers
        self.layer_kv_heads = [self.num_key_value_heads] * self.num_hidden_layers
        overrides = params.get("per_layer_config")
        if overrides is None:
            overrides = self._global_layer_overrides(params)
        for index, values in overrides.items():
            unknown = set(values) - set(PER_LAYER_OVERRIDES)
            if unknown:
                raise Gemma4Error(f"config: unsupported per-layer override(s) {sorted(unknown)}")
            layer = int(index)
            self.layer_head_dims[layer] = values.get("head_dim", self.head_dim)
            self.layer_kv_heads[layer] = values.get("num_key_value_heads", self.num_key_value_heads)

    def _global_layer_overrides(self, params: dict) -> dict:
        # Mirrors the reference's __post_init__: full layers take `global_head_dim`, and their own kv-head count
        # only where `attention_k_eq_v` is set.
        values = {"head_dim": params.get("global_head_dim", DEFAULT_GLOBAL_HEAD_DIM)}
        global_kv_heads = params.get("num_global_key_value_heads")
        if self.attention_k_eq_v and global_kv_heads is not None:
            values["num_key_value_heads"] = global_kv_heads
        return {i: values for i, kind in enumerate(self.layer_types) if kind == FULL}

    @property
    def kv_sharing_modes(self) -> list:
        """Per layer: None (own cache), "store" (own cache, also lent to later layers) or "reuse" (borrows)."""
        if self.num_kv_shared_layers == 0:
            return [None] * self.num_hidden_layers
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        modes = [None if i < first_shared else "reuse" for i in range(self.num_hidden_layers)]
        producers = self.layer_types[:first_shared]
        if set(producers) != set(self.layer_types):
            raise Gemma4Error("config: every layer kind that reuses a cache needs an earlier layer that makes one")
        for kind in set(self.layer_types):
            modes[first_shared - 1 - producers[::-1].index(kind)] = "store"
        return modes


@dataclass
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    rms_norm_eps: float = 1e-6
    output_proj_dims: int = 3840

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @classmethod
    def from_dict(cls, params: dict) -> "VisionConfig":
        return cls(**{k: v for k, v in params.items() if k in cls.__dataclass_fields__})


@dataclass
class AudioConfig:
    # Each audio soft token is one raw frame of `audio_embed_dim` samples (640 = 40 ms at 16 kHz).
    audio_embed_dim: int = 640
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, params: dict) -> "AudioConfig":
        return cls(**{k: v for k, v in params.items() if k in cls.__dataclass_fields__})


MODEL_TYPES = ("gemma4_unified", "gemma4_unified_text")


@dataclass
class ModelConfig:
    text_config: TextConfig
    vision_config: Optional[VisionConfig] = None
    audio_config: Optional[AudioConfig] = None
    model_type: str = "gemma4_unified"
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    image_token_id: int = 258_880
    video_token_id: int = 258_884
    boa_token_id: int = 256_000
    eoa_token_index: int = 258_883
    audio_token_id: int = 258_881
    quantization: Optional[dict] = None

    @classmethod
    def from_dict(cls, params: dict) -> "ModelConfig":
        model_type = params.get("model_type")
        if model_type not in MODEL_TYPES:
            raise Gemma4Error(f"model_type {model_type!r} is not Gemma 4 unified (expected one of {MODEL_TYPES})")
        if model_type == "gemma4_unified_text":
            return cls(text_config=TextConfig.from_dict(params), model_type=model_type,
                       quantization=params.get("quantization"))
        scalars = {k: v for k, v in params.items() if k in cls.__dataclass_fields__ and not k.endswith("_config")}
        vision = params.get("vision_config")
        audio = params.get("audio_config")
        text = TextConfig.from_dict(params.get("text_config") or {})
        # transformers ties the head by the top-level flag of the composite config, whatever text_config says.
        text.tie_word_embeddings = params.get("tie_word_embeddings", True)
        return cls(
            **scalars,
            text_config=text,
            vision_config=VisionConfig.from_dict(vision) if vision is not None else None,
            audio_config=AudioConfig.from_dict(audio) if audio is not None else None,
        )
