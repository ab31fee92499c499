"""The Gemma 4 unified text decoder, as `Gemma4UnifiedTextModel` / `Gemma4UnifiedForCausalLM` compute it."""

from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .attention import scaled_dot_product_attention
from .attention_mask import PositionMask
from .config import FULL, SLIDING, TextConfig
from .draft_policy import MAX_DRAFT_TOKENS
from .errors import Gemma4Error
from .fused_norms import (heads_use_kernel, normalized_heads, query_key_value, residual_then_norm, scaled_residual,
                          scaled_residual_then_norm)
from .kv_cache import FullCache, KVQuantization, WindowCache, held_arrays, read_fence_of
from .memory_bound import pace
from .quantized_layers import QuantizedLinear

# A ring's slots beyond the window: the key the MTP assistant reads one past the window, and a whole verify pass (the
# drafts and the token before them) to roll back.
RING_SPARE_SLOTS = 2 + MAX_DRAFT_TOKENS



class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.weight, self.eps)


def rms_norm_without_scale(x, eps: float):
    return mx.fast.rms_norm(x, None, eps)


def inverse_frequencies(head_dim: int, rope: dict) -> np.ndarray:
    """The reference's `inv_freq` for "default" and "proportional" RoPE, in float32 as torch computes it."""
    base = np.float32(rope["rope_theta"])
    if rope.get("rope_type", "default") == "default":
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        return (1.0 / base**exponents).astype(np.float32)
    # Proportional: only the first `rotated` frequency pairs turn; the rest have frequency zero, yet the rotation
    # still spans the whole head (pairs i and i + head_dim / 2), unlike a partial rotary of the first dims.
    rotated = int(rope.get("partial_rotary_factor", 1.0) * head_dim // 2)
    exponents = np.arange(0, 2 * rotated, 2, dtype=np.float32) / np.float32(head_dim)
    inverse = np.zeros(head_dim // 2, dtype=np.float32)
    inverse[:rotated] = 1.0 / base**exponents
    return inverse / np.float32(rope.get("factor", 1.0))


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope: dict):
        super().__init__()
        self.head_dim = head_dim
        with np.errstate(divide="ignore"):
            # mx.fast.rope takes wavelengths; a zero frequency is an infinite wavelength (cos 1, sin 0).
            self._wavelengths = mx.array(1.0 / inverse_frequencies(head_dim, rope))

    def __call__(self, x, offset: int):
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._wavelengths
        )

    def wavelengths(self) -> mx.array:
        return self._wavelengths


class Attention(nn.Module):
    FUSED = "qkv"  # the stacked projection that may replace q_proj, k_proj and v_proj (fuse_qkv)

    def __init__(self, config: TextConfig, layer_index: int):
        super().__init__()
        self.kind = config.layer_types[layer_index]
        self.head_dim = config.layer_head_dims[layer_index]
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = num_kv_heads = config.layer_kv_heads[layer_index]
        sharing = config.kv_sharing_modes[layer_index]
        self.reuses_kv = sharing == "reuse"
        self.stores_kv = sharing == "store"
        self.eps = config.rms_norm_eps
        bias = config.attention_bias

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, self.eps)
        if not self.reuses_kv:
            self.k_proj = nn.Linear(config.hidden_size, num_kv_heads * self.head_dim, bias=bias)
            self.k_norm = RMSNorm(self.head_dim, self.eps)
            # With k_eq_v (full layers only) the values are the keys before k_norm and RoPE.
            self.keys_are_values = config.attention_k_eq_v and self.kind == FULL
            if not self.keys_are_values:
                self.v_proj = nn.Linear(config.hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.rope = RotaryEmbedding(self.head_dim, config.rope_parameters[self.kind])

    def projection_names(self) -> list:
        if self.reuses_kv:
            return ["q_proj"]
        return ["q_proj", "k_proj"] if self.keys_are_values else ["q_proj", "k_proj", "v_proj"]

    def project(self, x) -> dict:
        """{"q_proj": queries, "k_proj": keys, "v_proj": values} (those the layer makes), before any norm."""
        names = self.projection_names()
        if "qkv" not in self:
            return {name: self[name](x) for name in names}
        splits = [self.query_rows, self.query_rows + self.key_rows][: len(names) - 1]
        return dict(zip(names, mx.split(self.qkv(x), splits, axis=-1)))

    def fuse_qkv(self):
        """One matmul for the query, key and value projections, as MLP.fuse_gate_and_up does for gate and up: a
        decoding step launches one kernel instead of three and reads the input once."""
        names = self.projection_names()
        stacked = stack_rows(*[self[name] for name in names]) if len(names) > 1 and "q_proj" in self else None
        if stacked is not None:
            self.query_rows, self.key_rows = self.q_proj.weight.shape[0], self.k_proj.weight.shape[0]
            self.qkv = stacked
            for name in names:
                self.pop(name)

    def unfused_weights(self) -> dict:
        """{"q_proj.weight": ..., "k_proj.scales": ...}: the fused projection split back."""
        if "qkv" not in self:
            return {}
        names = self.projection_names()
        splits = [self.query_rows, self.query_rows + self.key_rows][: len(names) - 1]
        return split_rows(self.qkv, splits, names)

    def __call__(self, x, mask, cache, offset: int, shared_kv: dict):
        batch, length, _ = x.shape
        if "qkv" in self and not self.reuses_kv and heads_use_kernel(x, self.head_dim):
            # One kernel for the heads' norms and rotations, straight from the fused projection.
            queries, keys, values = query_key_value(
                self.qkv(x), self.num_heads, self.num_kv_heads, self.head_dim, self.keys_are_values,
                self.q_norm.weight, self.k_norm.weight, self.rope.wavelengths(), offset, self.eps)
        else:
            projected = self.project(x)
            shape = (batch, length, -1, self.head_dim)
            raw_keys = None if self.reuses_kv else projected["k_proj"].reshape(shape)
            raw_values = raw_keys if self.reuses_kv or self.keys_are_values else projected["v_proj"].reshape(shape)
            queries, keys, values = normalized_heads(
                projected["q_proj"].reshape(shape), raw_keys, raw_values, self.q_norm.weight,
                None if self.reuses_kv else self.k_norm.weight, offset, self.eps, self.rope)

        if self.reuses_kv:
            keys, values = shared_kv[self.kind]
        else:
            if cache is not None:
                queries, keys, values = cache.write_then_fetch(queries, keys, values)
            if self.stores_kv:
                shared_kv[self.kind] = (keys, values)

        # Scale 1: q_norm already normalises the queries, as in the reference (`self.scaling = 1.0`).
        output = scaled_dot_product_attention(queries, keys, values, mask)
        # One query (a decoding step) needs no transpose: (batch, heads, 1, head_dim) reshapes straight to (batch, 1,
        # heads * head_dim), the same numbers in the same order, and a step's graph has a node fewer a layer.
        if length > 1:
            output = output.transpose(0, 2, 1, 3)
        return self.o_proj(output.reshape(batch, length, -1))


class MLP(nn.Module):
    FUSED = "gate_up"  # the stacked projection that may replace gate_proj and up_proj (fuse_gate_and_up)

    def __init__(self, config: TextConfig, layer_index: int):
        super().__init__()
        width = config.intermediate_size
        if config.use_double_wide_mlp and config.kv_sharing_modes[layer_index] == "reuse":
            width *= 2
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.gated = gated_activation(config.hidden_activation)

    def __call__(self, x):
        if ("gate_up" in self and self.gated is gelu_tanh_gate and isinstance(self.gate_up, QuantizedLinear)
                and self.gate_up.can_gate_in_kernel(x)):
            # Gated in the stacked product's kernel: one launch a layer fewer.
            return self.down_proj(self.gate_up.tanh_gated(x))
        if "gate_up" in self:
            gate, up = mx.split(self.gate_up(x), [self.gate_rows], axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.gated(gate, up))

    def fuse_gate_and_up(self):
        """One matmul for both input projections, when they are stored alike: each output row is its own dot
        product, so stacking the rows computes exactly what two matmuls compute, while a decoding step launches one
        kernel and reads the input once. The parameter tree then holds `gate_up`; `unfused_weights` gives the
        checkpoint's names back."""
        stacked = stack_rows(self.gate_proj, self.up_proj) if "gate_proj" in self else None
        if stacked is not None:
            self.gate_rows = self.gate_proj.weight.shape[0]
            self.gate_up = stacked
            self.pop("gate_proj")
            self.pop("up_proj")

    def unfused_weights(self) -> dict:
        """{"gate_proj.weight": ..., "up_proj.scales": ...}: the fused projection split back into the two."""
        if "gate_up" not in self:
            return {}
        return split_rows(self.gate_up, [self.gate_rows], ["gate_proj", "up_proj"])


def fuse_projections(module: nn.Module):
    """Fuse every MLP's gate and up projections and every attention's query, key and value projections in
    `module` (a loaded model or drafter), one at a time so that the separate weights are freed as they are stacked."""
    for _, child in module.named_modules():
        if isinstance(child, MLP):
            child.fuse_gate_and_up()
        elif isinstance(child, Attention):
            child.fuse_qkv()
        else:
            continue
        mx.eval(child.parameters())


def checkpoint_weights(module: nn.Module) -> dict:
    """{name: array} under the checkpoint's names (fused projections split back), for writing weights out."""
    fused = {f"{path}.{child.FUSED}.": child for path, child in module.named_modules()
             if isinstance(child, (MLP, Attention)) and child.FUSED in child}
    weights = {name: value for name, value in tree_flatten(module.parameters())
               if not any(name.startswith(prefix) for prefix in fused)}
    for prefix, child in fused.items():
        path = prefix.rsplit(".", 2)[0]
        weights.update({f"{path}.{name}": value for name, value in child.unfused_weights().items()})
    return weights


@partial(mx.compile, shapeless=True)
def gelu_tanh_gate(gate, up):
    return nn.gelu_approx(gate) * up


@partial(mx.compile, shapeless=True)
def gelu_gate(gate, up):
    return nn.gelu(gate) * up


GATED_ACTIVATIONS = {"gelu_pytorch_tanh": gelu_tanh_gate, "gelu": gelu_gate}


def gated_activation(name: str):
    """activation(gate) * up as one compiled kernel instead of two."""
    if name not in GATED_ACTIVATIONS:
        raise Gemma4Error(f"unsupported hidden_activation {name!r}; expected one of {', '.join(GATED_ACTIVATIONS)}")
    return GATED_ACTIVATIONS[name]


def stack_rows(*layers: nn.Module) -> Optional[nn.Module]:
    """A linear layer whose output rows are each of `layers`' in turn, or None when they cannot share one: different
    quantization (a mixed recipe), or a bias. Affine quantization groups run along the input, so stacking rows keeps
    every group intact."""
    first = layers[0]
    if any(type(layer) is not type(first) or "bias" in layer for layer in layers):
        return None
    if isinstance(first, nn.QuantizedLinear):
        if any((layer.bits, layer.group_size, layer.mode) != (first.bits, first.group_size, first.mode)
               for layer in layers):
            return None
        stacked = nn.QuantizedLinear(first.group_size, 1, bias=False, group_size=first.group_size,
                                     bits=first.bits, mode=first.mode)
    elif isinstance(first, nn.Linear):
        stacked = nn.Linear(1, 1, bias=False)
    else:
        return None
    stacked.update({key: mx.concatenate([layer[key] for layer in layers]) for key in first.parameters()})
    return stacked


def split_rows(stacked: nn.Module, splits: list, names: list) -> dict:
    """{"<name>.<parameter>": rows}: a stacked layer's parameters cut back at `splits` into the named layers'."""
    return {f"{name}.{key}": pieces[index] for key, value in stacked.parameters().items()
            for pieces in [mx.split(value, splits)] for index, name in enumerate(names)}


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config, layer_index)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x, mask, cache, offset: int, shared_kv: dict):
        h, normed = self.attended_residual(x, self.input_layernorm(x), mask, cache, offset, shared_kv)
        return scaled_residual(h, self.mlp(normed), self.post_feedforward_layernorm.weight, self.layer_scalar,
                               self.input_layernorm.eps)

    def then_norm(self, x, normed_x, mask, cache, offset: int, shared_kv: dict, next_norm: RMSNorm) -> tuple:
        """(the layer's output, next_norm of it) from its input x and input_layernorm(x): a stack of layers hands
        each the norm of its input that the layer before made (the next layer's input norm, or the final norm)."""
        h, normed = self.attended_residual(x, normed_x, mask, cache, offset, shared_kv)
        # The cache's writes go with the attention: nothing reads a sliding ring's new slots before the next chunk,
        # and until they run they keep the chunk's keys and values alive (~1 GB over the 12B's 40 sliding layers).
        pace(h, normed, *held_arrays(cache))
        return scaled_residual_then_norm(h, self.mlp(normed), self.post_feedforward_layernorm.weight,
                                         self.layer_scalar, next_norm.weight, self.input_layernorm.eps)

    def attended_residual(self, x, normed_x, mask, cache, offset: int, shared_kv: dict) -> tuple:
        """h = x + norm(attention) and the MLP's input norm(h); then the caller's (h + norm(MLP)) * scalar. Each
        step is one kernel where fused_norms' rule allows."""
        attended = self.self_attn(normed_x, mask, cache, offset, shared_kv)
        return residual_then_norm(x, attended, self.post_attention_layernorm.weight,
                                  self.pre_feedforward_layernorm.weight, self.input_layernorm.eps)


class TextModel(nn.Module):
    """Embeddings, decoder layers and final norm; weights under `language_model.model.*`."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cached_layers = [i for i, mode in enumerate(config.kv_sharing_modes) if mode != "reuse"]

    def embed(self, input_ids):
        embeddings = self.embed_tokens(input_ids)
        # The reference casts sqrt(hidden_size) to the weight dtype first: 61.97 becomes 62.0 in bfloat16.
        return embeddings * mx.array(self.config.hidden_size**0.5, dtype=embeddings.dtype)

    def make_cache(self, quantization: Optional[KVQuantization] = None) -> list:
        """One cache per layer that owns its keys and values: a ring for sliding layers (memory bounded whatever the
        context), a growing buffer for full layers, all quantized alike if `quantization` says so. Layers that reuse
        another's KV get none.

        Every ring holds RING_SPARE_SLOTS slots beyond the window, so that any cache serves speculative decoding too
        (it rolls back rejected drafts) and plain steps read the very buffers a verify pass reads: on the GPU a
        verify pass then gives bit for bit the logits of plain steps (decode_attention.py)."""
        slots = self.config.sliding_window + RING_SPARE_SLOTS
        return [
            WindowCache(self.config.sliding_window, slots, quantization=quantization)
            if self.config.layer_types[i] == SLIDING else FullCache(quantization)
            for i in self.cached_layers
        ]

    def __call__(
        self,
        embeddings: mx.array,
        cache: Optional[list] = None,
        block_ids: Optional[mx.array] = None,
        shared_kv: Optional[dict] = None,
        masks: Optional[dict] = None,
    ) -> mx.array:
        """`masks` ({layer kind: mask}) replaces the masks made from the cache's offset: a compiled decode step
        (decode_step.py) reads whole fixed-size buffers and masks their unwritten rows itself."""
        length = embeddings.shape[1]
        offset = cache[0].offset if cache else 0
        masks = masks or self.masks(offset, length, block_ids)
        layer_caches = dict(zip(self.cached_layers, cache or []))
        shared_kv = {} if shared_kv is None else shared_kv
        h, normed = embeddings, self.layers[0].input_layernorm(embeddings)
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, normed = layer.then_norm(h, normed, masks[self.config.layer_types[i]], layer_caches.get(i), offset,
                                        shared_kv, next_norm)
            pace(h, normed)
        if cache:
            fence = read_fence_of(normed, copied=True)  # every read of the caches in this pass went into it
            pace(fence)  # a prefill chunk's is evaluated with it, so that it holds none of the chunk's arrays
            for layer_cache in cache:
                layer_cache.read_fence = fence
        return normed

    def masks(self, offset: int, length: int, block_ids: Optional[mx.array]) -> dict:
        if length == 1:
            # One query: every cached key is in the past, and a window cache hands it only keys within the window.
            return {FULL: None, SLIDING: None}
        full = "causal" if block_ids is None else PositionMask(offset, length, None, block_ids)
        return {FULL: full, SLIDING: PositionMask(offset, length, self.config.sliding_window, block_ids)}


class LanguageModel(nn.Module):
    """TextModel plus the LM head (tied to the embeddings unless the config says otherwise) and softcapping."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(hidden)
        else:
            logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = mx.tanh(logits / cap) * cap
        return logits
