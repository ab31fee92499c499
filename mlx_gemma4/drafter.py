"""The Gemma 4 assistant drafter (`Gemma4UnifiedAssistantForCausalLM`): a small decoder that owns no keys or values.

It reads the target's final-normed hidden state and the next token's (scaled) target embedding, and attends with one
query over the target's own stored keys and values: those of the target's last full and last sliding layer. Each
step also hands back a state projected to the target's width, which feeds the next draft step in place of the
target's hidden state, so one target pass can be followed by several draft tokens at one position.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .config import FULL, SLIDING, TextConfig
from .decode_step import CompiledSteps
from .decoder import TextModel
from .draft_policy import DraftPolicy
from .errors import Gemma4Error
from .json_files import read_json
from .kv_cache import last_rows
from .loading import check_dtype, load_weights, resolve_model_path
from .model import DERIVED_TENSORS

ASSISTANT_MODEL_TYPE = "gemma4_unified_assistant"


class AssistantTextConfig(TextConfig):
    """Every assistant layer reuses the target's keys and values. The reference config forces
    num_kv_shared_layers = num_hidden_layers, a case the target's own sharing rule (which needs a producing layer
    of each kind) cannot express, so it is stated here."""

    @property
    def kv_sharing_modes(self) -> list:
        return ["reuse"] * self.num_hidden_layers


@dataclass
class AssistantConfig:
    text_config: AssistantTextConfig
    backbone_hidden_size: int = 3840
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    quantization: Optional[dict] = field(default=None)

    @classmethod
    def from_dict(cls, params: dict) -> "AssistantConfig":
        if params.get("model_type") != ASSISTANT_MODEL_TYPE:
            raise Gemma4Error(
                f"model_type {params.get('model_type')!r} is not a Gemma 4 assistant "
                f"(expected {ASSISTANT_MODEL_TYPE!r})"
            )
        scalars = {k: v for k, v in params.items() if k in cls.__dataclass_fields__ and k != "text_config"}
        config = cls(text_config=AssistantTextConfig.from_dict(params.get("text_config") or {}), **scalars)
        if config.use_ordered_embeddings and config.text_config.vocab_size % config.num_centroids:
            raise Gemma4Error("assistant config: vocab_size must be a multiple of num_centroids")
        return config


class MaskedEmbedder(nn.Module):
    """The centroid-masked LM head: score the centroids, keep the top ones, and compute logits only for the tokens of
    those clusters (`token_ordering` lists the vocabulary cluster by cluster). Every other token gets one value below
    the smallest computed logit, as the reference fills it."""

    def __init__(self, config: AssistantConfig):
        super().__init__()
        text = config.text_config
        self.top_k = config.centroid_intermediate_top_k
        self.num_centroids = config.num_centroids
        self.vocab_size = text.vocab_size
        self.centroids = nn.Linear(text.hidden_size, config.num_centroids, bias=False)
        self.token_ordering = mx.zeros((text.vocab_size,), dtype=mx.int32)

    def __call__(self, hidden: mx.array, token_rows) -> mx.array:
        batch, length, _ = hidden.shape
        centroid_logits = self.centroids(hidden)
        top_centroids = mx.argpartition(-centroid_logits, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        clusters = self.token_ordering.reshape(self.num_centroids, -1)
        selected = clusters[top_centroids].reshape(batch, length, -1)
        rows = token_rows(selected)
        selected_logits = (hidden[..., None, :] @ rows.swapaxes(-1, -2)).squeeze(-2)
        fill = mx.min(selected_logits) - 1.0
        logits = mx.broadcast_to(fill.astype(hidden.dtype), (batch, length, self.vocab_size))
        return mx.put_along_axis(logits, selected, selected_logits, axis=-1)


class Drafter(nn.Module):
    def __init__(self, config: AssistantConfig):
        super().__init__()
        self.config = config
        text = config.text_config
        self.model = TextModel(text)
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, config.backbone_hidden_size, bias=False)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedder(config)
        # What the adaptive draft length has learned with the target this drafter runs with (acceptance at each
        # draft position, round times): a chat's later turns start from it instead of exploring again.
        self.draft_policy = DraftPolicy()
        # The compiled draft step (see __call__'s `masks`), traced again when the buffers change shape.
        self.compiled_steps = CompiledSteps()

    def __call__(self, token_embedding: mx.array, target_hidden: mx.array, target_kv: dict,
                 position: Union[int, mx.array], masks: Optional[dict] = None):
        """One draft step: (logits, projected state) for the token after `token_embedding`, which sits at `position`.

        `target_kv` maps "full_attention" / "sliding_attention" to the target's (keys, values) of its last layer of
        that kind, for every position before `position`, in order. With `masks` ({kind: which rows to see}) it holds
        the target's whole buffers instead (a full layer's in position order, a sliding layer's ring, as
        speculative.assistant_view hands them) and the step runs as one compiled function: the graph of a draft
        step is not rebuilt in Python at every draft."""
        assert token_embedding.shape[1] == 1, "the assistant drafts from one position at a time"
        if masks is None:
            # The reference's bidirectional masks, seen from one query: full layers see every stored key; sliding
            # layers the keys within `sliding_window` of the newest (inclusive, so window + 1 of them).
            recent = self.config.text_config.sliding_window + 1
            visible = {FULL: target_kv[FULL], SLIDING: tuple(last_rows(rows, recent) for rows in target_kv[SLIDING])}
            return self.step(token_embedding, target_hidden, visible, position, {FULL: None, SLIDING: None})
        at = position if isinstance(position, mx.array) else mx.array([position])
        return self.compiled_step()(token_embedding, target_hidden, target_kv, at, masks)

    def compiled_step(self):
        """A function with __call__'s arguments (`masks` given; `position` a (1,) array, which the speculative loop may
        still be computing on the device) that runs the draft step as one compiled function with the weights the
        drafter holds now. Checking them walks every parameter (0.18 ms on a 2-core CPU for a random assistant of the
        12B's shape), so the speculative loop makes one of these per generation, as decode_step does for the target,
        rather than checking at every draft."""
        self.compiled_steps.drop_if_stale(self)
        if "draft" not in self.compiled_steps.functions:
            self.compiled_steps.functions["draft"] = mx.compile(self.step)
        return self.compiled_steps.functions["draft"]

    def step(self, token_embedding: mx.array, target_hidden: mx.array, visible: dict, position, masks: dict):
        h = self.pre_projection(mx.concatenate([token_embedding, target_hidden], axis=-1))
        for kind, layer in zip(self.config.text_config.layer_types, self.model.layers):
            h = layer(h, masks[kind], None, position, visible)
        h = self.model.norm(h)
        return self.logits(h), self.post_projection(h)

    def logits(self, hidden: mx.array) -> mx.array:
        # No final softcapping: the assistant's head is a plain projection in the reference.
        if self.config.use_ordered_embeddings:
            return self.masked_embedding(hidden, self.token_rows)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def token_rows(self, token_ids: mx.array) -> mx.array:
        """LM-head rows (output embeddings) of `token_ids`, quantized or not."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens(token_ids)
        if isinstance(self.lm_head, nn.QuantizedLinear):
            raise Gemma4Error("a quantized untied assistant head with ordered embeddings is not supported")
        return self.lm_head.weight[token_ids]

    def sanitize(self, weights: dict) -> dict:
        """Hugging Face names are already ours; drop recomputed buffers and the tied head."""
        return {
            name: value
            for name, value in weights.items()
            if not any(part in name for part in DERIVED_TENSORS)
            and not (name == "lm_head.weight" and self.config.tie_word_embeddings)
        }


def check_compatible(drafter: Drafter, target) -> None:
    """The assistant must read this target's states: its width, its vocabulary and its attention head sizes."""
    target_text = target.config.text_config
    assistant = drafter.config
    if assistant.backbone_hidden_size != target_text.hidden_size:
        raise Gemma4Error(
            f"the draft model expects a target of hidden size {assistant.backbone_hidden_size}, "
            f"this target has {target_text.hidden_size}"
        )
    if assistant.text_config.vocab_size != target_text.vocab_size:
        raise Gemma4Error(
            f"the draft model's vocabulary ({assistant.text_config.vocab_size}) differs from the target's "
            f"({target_text.vocab_size})"
        )
    for kind in (FULL, SLIDING):
        if kind not in target_text.layer_types or kind not in assistant.text_config.layer_types:
            continue
        target_dim = target_text.layer_head_dims[max(i for i, t in enumerate(target_text.layer_types) if t == kind)]
        draft_dim = assistant.text_config.layer_head_dims[assistant.text_config.layer_types.index(kind)]
        if target_dim != draft_dim:
            raise Gemma4Error(f"the draft model's {kind} head size {draft_dim} differs from the target's {target_dim}")


def load_drafter(path_or_repo: Union[str, Path], dtype: Optional[str] = None) -> Drafter:
    """The assistant from a local folder or Hub id, Hugging Face or converted layout, quantized or not."""
    check_dtype(dtype)
    model_path = resolve_model_path(path_or_repo)
    config = AssistantConfig.from_dict(read_json(model_path / "config.json"))
    return load_weights(Drafter(config), model_path, config.quantization, dtype)
