"""Tiny random Gemma 4 assistants made with the transformers classes, shaped to read the tiny reference target's
states (reference_models.text_config): hidden 48, sliding heads of 12, full heads of 20."""

import contextlib
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.draft_policy import DraftPolicy
from mlx_gemma4.kv_cache import FullCache, WindowCache
from reference_models import randomize, save_reference_checkpoint

TARGET_HIDDEN = 48
# The speculative tests' target: a window this small is passed many times over by a few dozen tokens.
SLIDING_WINDOW = 4


def save_small_window_target(folder: Path) -> Path:
    """The tiny text-only reference target the speculative tests decode with, its window SLIDING_WINDOW."""
    save_reference_checkpoint(folder, dict(sliding_window=SLIDING_WINDOW), vision=False, audio=False, seed=7)
    return folder


def assistant_text_config(**overrides) -> dict:
    config = dict(
        hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, global_head_dim=20, num_global_key_value_heads=1, attention_k_eq_v=True, vocab_size=389,
        sliding_window=6, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention", "full_attention"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    config.update(overrides)
    return config


@contextlib.contextmanager
def all_layers_reuse():
    """transformers 5.23's `kv_sharing_modes` raises when every layer reuses the target's KV (the assistant's own
    case); for the fixture's lifetime every text config with all layers shared answers "reuse" for each."""
    from transformers import Gemma4UnifiedTextConfig

    original = Gemma4UnifiedTextConfig.kv_sharing_modes

    def modes(config):
        if config.num_kv_shared_layers == config.num_hidden_layers:
            return ["reuse"] * config.num_hidden_layers
        return original.fget(config)

    Gemma4UnifiedTextConfig.kv_sharing_modes = property(modes)
    try:
        yield
    finally:
        Gemma4UnifiedTextConfig.kv_sharing_modes = original


def build_reference_assistant(seed=0, ordered=False, num_centroids=8, top_k=3, backbone=TARGET_HIDDEN, **overrides):
    """A random Gemma4UnifiedAssistantForCausalLM in float32 eager mode; with `ordered`, the centroid-masked head and a
    random token ordering. Call inside `all_layers_reuse()`."""
    import torch
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM

    torch.manual_seed(seed)
    config = Gemma4UnifiedAssistantConfig(
        text_config=assistant_text_config(**overrides), backbone_hidden_size=backbone,
        use_ordered_embeddings=ordered, num_centroids=num_centroids, centroid_intermediate_top_k=top_k,
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    model = Gemma4UnifiedAssistantForCausalLM(config).eval()
    randomize(model, seed + 1)
    if ordered:
        generator = torch.Generator().manual_seed(seed + 2)
        vocab = config.text_config.vocab_size
        model.masked_embedding.token_ordering.copy_(torch.randperm(vocab, generator=generator))
    return model


def save_reference_assistant(folder: Path, **options):
    with all_layers_reuse():
        model = build_reference_assistant(**options)
        model.save_pretrained(str(folder))
    return model


class ScriptedDrafter:
    """A drafter double that proposes the plain greedy continuation (`wrong`: always another token)."""

    def __init__(self, drafter, sequence: list, wrong: bool = False):
        self.config = drafter.config  # passes stream_generate's compatibility check
        self.sequence = mx.array(list(sequence) + [0])  # 0 past its end
        self.vocab_size, self.wrong = drafter.config.text_config.vocab_size, wrong
        self.position, self.step = None, 0
        self.draft_policy = DraftPolicy()

    def compiled_step(self):
        return self  # the speculative loop calls it as a Drafter's compiled step

    def __call__(self, token_embedding, target_hidden, target_kv, position, masks=None):
        # A round's steps share its position array, which may still be computed on the device: the proposal is too.
        if position is not self.position:
            self.position, self.step = position, 0
        index = mx.minimum(position + 1 + self.step, self.sequence.size - 1)
        self.step += 1
        token = mx.take(self.sequence, index)
        if self.wrong:
            token = (token + 1) % self.vocab_size
        logits = mx.where(mx.arange(self.vocab_size) == token, 10.0, 0.0).reshape(1, 1, self.vocab_size)
        return logits, target_hidden


def window_sized_rings(model) -> list:
    """Caches whose rings hold exactly the window, as prompt-cache files written before make_cache added spare slots
    hold them: they cannot roll positions back."""
    return [WindowCache(c.window) if isinstance(c, WindowCache) else FullCache() for c in model.make_cache()]
