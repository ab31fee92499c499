"""Prompt caches saved to and loaded from a file, so that a long document is prefilled once and reused.

The file is mlx-lm's `save_prompt_cache` safetensors layout (written by that very function): each layer's `state`
flattened into arrays, and a metadata tree of [user metadata, cache class names, scalar markers]. Ours adds to the
user metadata a fingerprint of the model (its text config and a few of its weights), and loading refuses a file
whose fingerprint is not the model's: another model's keys and values would decode garbage without an error.
"""

import hashlib
import json
from pathlib import Path
from typing import Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import save_prompt_cache as save_in_mlx_lm_layout

from .errors import Gemma4Error
from .kv_cache import FullCache, WindowCache

CACHE_CLASSES = {cls.__name__: cls for cls in (FullCache, WindowCache)}
FINGERPRINT_KEY = "mlx_gemma4_model_fingerprint"
# Metadata saying the cached prompt ends inside an open user turn (cache_prompt's default), which a continuation closes.
OPEN_TURN_KEY = "chat_turn_open"
# Rows of each embedding parameter hashed into the fingerprint: enough to tell two checkpoints apart.
FINGERPRINT_ROWS = 8


def model_fingerprint(model) -> str:
    """A hash of what makes one model's keys and values mean something to it: its text config, its parameter dtypes
    and quantization, and the values of a few small weights (first embedding rows, first and last norms)."""
    text = model.language_model.model
    digest = hashlib.sha256(json.dumps(vars(text.config), sort_keys=True, default=str).encode())
    pieces = [value[:FINGERPRINT_ROWS] for _, value in tree_flatten(text.embed_tokens.parameters())]
    pieces += [text.layers[0].input_layernorm.weight, text.norm.weight]
    for piece in pieces:
        digest.update(str(piece.dtype).encode())
        digest.update(np.array(piece.astype(mx.float32) if piece.dtype == mx.bfloat16 else piece).tobytes())
    return digest.hexdigest()


def save_prompt_cache(path: Union[str, Path], cache: list, model, metadata: dict = None):
    """Writes `cache` (made for `model`) to `path` (.safetensors), with `metadata` (str to str) beside it. The file
    is written beside `path` and renamed onto it, so a failed save never leaves half a file under that name."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise Gemma4Error(f"a prompt cache file must end in .safetensors: {path}")
    if not cache or cache[0].offset == 0:
        raise Gemma4Error("the prompt cache is empty: nothing to save")
    temporary = path.with_name(path.stem + ".partial.safetensors")
    save_in_mlx_lm_layout(str(temporary), cache, {**(metadata or {}), FINGERPRINT_KEY: model_fingerprint(model)})
    temporary.replace(path)


def load_prompt_cache(path: Union[str, Path], model, return_metadata: bool = False):
    """The cache saved in `path`, ready to continue with `model` (and its metadata, with `return_metadata`).
    Raises Gemma4Error when the file is missing, damaged, not a prompt cache, or made with another model."""
    path = Path(path)
    if not path.is_file():
        raise Gemma4Error(f"no prompt cache file at {path}")
    try:
        arrays, flat_metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError):
        raise Gemma4Error(f"cannot read the prompt cache file {path}: not a safetensors file, or damaged") from None
    try:
        metadata, classes, scalars = tree_unflatten(list(flat_metadata.items()))
        fingerprint = metadata.get(FINGERPRINT_KEY)
    except (ValueError, TypeError, AttributeError, KeyError):
        fingerprint = None
    if fingerprint is None:
        raise Gemma4Error(f"{path} is not a prompt cache saved by mlx_gemma4")
    if fingerprint != model_fingerprint(model):
        raise Gemma4Error(f"the prompt cache in {path} was made with another model; prefill it again for this one")
    try:
        # The file's arrays, held by nothing else: later steps may write them in place.
        cache = [CACHE_CLASSES[name].from_state(state, buffers_shared=False)
                 for name, state in zip(classes, states(arrays, scalars))]
    except (KeyError, ValueError, TypeError, IndexError):
        raise Gemma4Error(f"the prompt cache file {path} is damaged") from None
    expected = len(model.language_model.model.cached_layers)
    if len(cache) != expected:
        raise Gemma4Error(f"the prompt cache file {path} is damaged: {len(cache)} layers, not {expected}")
    return (cache, metadata) if return_metadata else cache


def states(arrays: dict, scalars: list) -> list:
    """Each layer's state as save_in_mlx_lm_layout flattened it, its scalars restored (the inverse of mlx-lm's
    encoding: an int or float as a 0-d array, None as an empty one)."""
    for position, kind in scalars[1:]:
        if kind == "scalar":
            arrays[position] = arrays[position].item()
        elif kind == "none":
            arrays[position] = None
        else:
            raise ValueError(kind)
    return tree_unflatten(list(arrays.items()))


def continuation_ids(processor, metadata: dict, user_text: str, chat_template: bool = True, **template_options) -> list:
    """Token ids that continue a loaded prompt cache with `user_text`: when the cached prompt left the user's turn
    open, the text, the turn's end and the model's turn (as mlx-lm's generate continues its cache_prompt files)."""
    text = user_text
    if metadata.get(OPEN_TURN_KEY) == "true" and chat_template:
        text = processor.continuation_prompt(user_text, **template_options)
    # The cached prompt began with <bos>: the continuation must not start another sequence.
    return processor.tokenizer.encode(text, add_special_tokens=False)
