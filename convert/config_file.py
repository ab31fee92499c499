"""config.json of a converted folder: the source's, plus the quantization block and the keys peers need.

mlx-gemma4, mlx-lm (text) and mlx-vlm (multimodal) all read the result; mlx-lm and mlx-vlm read some settings under
other names or with other defaults than transformers, which `add_peer_config_keys` spells out.
"""

import copy
import json
from pathlib import Path
from typing import Optional

from mlx_gemma4.config import FULL, TextConfig
from mlx_gemma4.loading import DTYPES


def source_dtype_name(config: dict) -> Optional[str]:
    text_config = config.get("text_config") or {}
    for value in (config.get("dtype"), config.get("torch_dtype"), text_config.get("dtype")):
        if value in DTYPES:
            return value
    return None


def add_peer_config_keys(text_config: dict):
    """Keys mlx-lm and mlx-vlm need to read this text config as transformers and mlx-gemma4 do.

    transformers 5.23 saves full-attention head sizes only as `per_layer_config`; the peers read `global_head_dim`
    and `num_global_key_value_heads`. Where the overrides are the same on every full layer, those keys are written
    too (transformers and mlx-gemma4 let `per_layer_config` win). mlx-lm's Gemma 4 text model assumes per-layer
    input embeddings and KV sharing (the E2B/E4B models) unless told otherwise; where the unified config leaves
    them out they are 0, as transformers reads them.
    """
    text_config.setdefault("hidden_size_per_layer_input", 0)
    text_config.setdefault("num_kv_shared_layers", 0)
    # Peers default to other layer patterns; spell out the one mlx-gemma4 and transformers derive.
    text_config.setdefault("layer_types", TextConfig.from_dict(text_config).layer_types)
    overrides = text_config.get("per_layer_config")
    full = [str(i) for i, kind in enumerate(text_config.get("layer_types") or []) if kind == FULL]
    if not overrides or sorted(overrides, key=int) != full:
        return
    distinct = {json.dumps(values, sort_keys=True) for values in overrides.values()}
    if len(distinct) != 1:
        return
    values = next(iter(overrides.values()))
    if "head_dim" in values:
        text_config.setdefault("global_head_dim", values["head_dim"])
    if "num_key_value_heads" in values:
        text_config.setdefault("num_global_key_value_heads", values["num_key_value_heads"])


def write_config(folder: Path, config: dict, quantization: Optional[dict], dtype_name: Optional[str]):
    config = copy.deepcopy(config)
    config.pop("_name_or_path", None)
    if config.get("model_type") == "gemma4_unified" and isinstance(config.get("text_config"), dict):
        add_peer_config_keys(config["text_config"])
        # mlx-lm's gemma4 wrapper overwrites the text vocabulary size with a top-level one (default 262144).
        config.setdefault("vocab_size", config["text_config"].get("vocab_size"))
    elif config.get("model_type") == "gemma4_unified_text":
        add_peer_config_keys(config)
    if quantization is not None:
        # mlx-lm reads "quantization", mlx-vlm and Hugging Face tooling "quantization_config"; both say the same.
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    if dtype_name is not None:
        for holder in (config, config.get("text_config") or {}):
            if "dtype" in holder or holder is config:
                holder["dtype"] = dtype_name
    (folder / "config.json").write_text(json.dumps(config, indent=4) + "\n")
