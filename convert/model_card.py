"""README.md for a converted folder: what it was made from, how it is quantized, how to run it, its licence.

The licence is the source's, copied from the front matter of the source's own model card (`license`, and for custom
terms `license_name` and `license_link`); when the source has no card that says, the card says the base model's
terms apply rather than guess.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

LICENCE_KEYS = ("license", "license_name", "license_link")


@dataclass
class CardFacts:
    base_model: Optional[str]  # Hub id of the source, when known
    quantization: str  # one line, e.g. "4-bit affine, group size 64"
    size_bytes: int
    bits_per_weight: Optional[float]
    is_assistant: bool
    run_name: str  # what a reader passes to load(): the upload repo, or the local folder
    licence: dict = field(default_factory=dict)  # the source card's LICENCE_KEYS that it sets; {} when unknown


def source_licence(source: Path) -> dict:
    """The licence keys of the source's model card front matter, or {} without a card or without a licence there."""
    import yaml
    from huggingface_hub import metadata_load

    card = source / "README.md"
    try:
        metadata = metadata_load(card) if card.is_file() else None
    except (ValueError, UnicodeDecodeError, OSError, yaml.YAMLError):  # a malformed card: no licence to copy
        metadata = None
    if not isinstance(metadata, dict) or not metadata.get("license"):
        return {}
    return {key: str(metadata[key]) for key in LICENCE_KEYS if metadata.get(key)}


def front_matter(facts: CardFacts) -> str:
    lines = ["---"] + [f"{key}: {value}" for key, value in facts.licence.items()] + ["library_name: mlx"]
    if facts.base_model:
        lines += ["base_model:", f"- {facts.base_model}"]
    lines += [
        f"pipeline_tag: {'text-generation' if facts.is_assistant else 'image-text-to-text'}",
        "tags:", "- mlx", "- gemma4", "- mlx-gemma4", "---", "",
    ]
    return "\n".join(lines)


# mlx-gemma4 is installed from its source repository, not from PyPI.
INSTALL_MLX_GEMMA4 = "pip install -e .   # in a checkout of the mlx-gemma4 repository (it is not on PyPI)"


def usage(facts: CardFacts) -> str:
    if facts.is_assistant:
        return (
            "This is the multi-token-prediction assistant (drafter) of Gemma 4 unified. It drafts tokens for a\n"
            "Gemma 4 unified target model during speculative decoding with mlx-gemma4; it does not run alone.\n\n"
            f"```bash\n{INSTALL_MLX_GEMMA4}\n"
            f'mlx-gemma4 --model TARGET --draft-model {facts.run_name} --prompt "Why is the sky blue?"\n```\n'
        )
    return (
        "With mlx-vlm (from PyPI):\n\n"
        "```bash\npip install -U mlx-vlm\n"
        f'python -m mlx_vlm.generate --model {facts.run_name} --prompt "Why is the sky blue?" --max-tokens 200\n```\n\n'
        "With mlx-gemma4:\n\n"
        f"```bash\n{INSTALL_MLX_GEMMA4}\n"
        f'mlx-gemma4 --model {facts.run_name} --prompt "Why is the sky blue?"\n```\n\n'
        "```python\nfrom mlx_gemma4 import generate, load\n\n"
        f'model, processor = load("{facts.run_name}")\n'
        'print(generate(model, processor, processor.chat_prompt("Why is the sky blue?"), max_tokens=200))\n```\n'
    )


def licence_text(facts: CardFacts) -> str:
    base = f" ([{facts.base_model}](https://huggingface.co/{facts.base_model}))" if facts.base_model else ""
    if not facts.licence:
        return f"The base model's terms{base} apply to these weights.\n"
    name = facts.licence.get("license_name") or facts.licence["license"]
    link = facts.licence.get("license_link")
    named = f"[{name}]({link})" if link else f"`{name}`"
    return f"The base model's licence{base}: {named}, as its model card states.\n"


def model_card(facts: CardFacts) -> str:
    source = f"[{facts.base_model}](https://huggingface.co/{facts.base_model})" if facts.base_model else "a local checkpoint"
    bits = f", {facts.bits_per_weight:.2f} bits per weight on average" if facts.bits_per_weight else ""
    kind = "MTP assistant of Gemma 4 unified" if facts.is_assistant else "Gemma 4 unified (text, image, audio, video)"
    return (
        front_matter(facts)
        + f"# {Path(facts.run_name).name}\n\n"
        + f"{kind} in MLX format, converted from {source} with mlx-gemma4's `convert/convert.py`.\n\n"
        + f"## Quantization\n\n{facts.quantization}{bits}; {facts.size_bytes / 1e9:.2f} GB of weights.\n\n"
        + f"## Use\n\n{usage(facts)}\n"
        + f"## Licence\n\n{licence_text(facts)}"
    )


def write_model_card(folder: Path, facts: CardFacts):
    (folder / "README.md").write_text(model_card(facts))
