"""Mixed-precision recipes: which layers keep more bits than the rest.

A recipe's `build(full_attention_layers, num_layers, group_size)` returns `choose(path)`: True for the default
bits, a {"group_size", "bits"} dict for other settings, False to leave the layer unquantized.

mixed_4_8 keeps the tied embedding (it is also the output head) and the tensors that make attention values at 8
bits; mlp_8 keeps the MLP at 8 bits, the layout of some widely shared community "4-bit" conversions. What each costs
in quality and weighs on the 12B is measured by bench/studies/quant_quality.py on a trained small target
(bench/results/quant-quality-small-pair.json) and tabled in README.md.
"""

import re
from dataclasses import dataclass
from typing import Callable, Optional

HIGH_BITS = 8
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(path: str) -> Optional[int]:
    match = LAYER_INDEX.search(path)
    return int(match.group(1)) if match else None


@dataclass
class Recipe:
    summary: str
    build: Callable


def attention_values_and_embeddings(full_attention_layers: set, num_layers: int, group_size: int) -> Callable:
    """The tied embedding (it is also the output head) and every tensor that makes attention values (v_proj, and
    k_proj on full layers where K = V) at 8 bits; the rest at the default bits."""
    high = {"group_size": group_size, "bits": HIGH_BITS}

    def choose(path: str):
        if path.endswith(("embed_tokens", "lm_head", "self_attn.v_proj")):
            return high
        if path.endswith("self_attn.k_proj") and layer_index(path) in full_attention_layers:
            return high
        return True

    return choose


def mlp_at_high_bits(full_attention_layers: set, num_layers: int, group_size: int) -> Callable:
    """Every MLP projection (gate, up, down: two thirds of the decoder's weights) at 8 bits, the rest at the
    default bits: the layout of some widely shared community "4-bit" conversions."""
    high = {"group_size": group_size, "bits": HIGH_BITS}
    return lambda path: high if ".mlp." in path else True


RECIPES = {
    "mixed_4_8": Recipe(
        "embeddings / output head and attention values at 8 bits, the rest at 4",
        attention_values_and_embeddings,
    ),
    "mlp_8": Recipe("the MLP at 8 bits, the rest at 4", mlp_at_high_bits),
}
