"""README.md for a converted folder: what it was made from, how it is quantized, how to run it, its license."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

LICENSE = "apache-2.0"


@dataclass
class CardFacts:
    base_model: Optional[str]  # Hub id of the source, when known
    quantization: str  # one line, e.g. "4-bit affine, group size 64"
    size_bytes: int
    bits_per_weight: Optional[float]
    is_assistant: bool
    run_name: str  # what a reader passes to load(): the upload repo, or the local folder


def front_matter(facts: CardFacts) -> str:
    lines = ["---", f"license: {LICENSE}", "library_name: mlx"]
    if facts.base_model:
        lines += ["base_model:", f"- {facts.base_model}"]
    lines += [
        f"pipeline_tag: {'text-generation' if facts.is_assistant else 'image-text-to-text'}",
        "tags:", "- mlx", "- gemma4", "- mlx-gemma4", "---", "",
    ]
    return "\n".join(lines)


def usage(facts: CardFacts) -> str:
    if facts.is_assistant:
        return (
            "This is the multi-token-prediction assistant (drafter) of Gemma 4 unified. It drafts tokens for a\n"
            "Gemma 4 unified target model during speculative decoding with mlx-gemma4; it does not run alone.\n"
        )
    return (
        "```bash\npip install mlx-gemma4\n"
        f'python -m mlx_gemma4.generate --model {facts.run_name} --prompt "Why is the sky blue?"\n```\n\n'
        "```python\nfrom mlx_gemma4.generation import generate\nfrom mlx_gemma4.loading import load\n\n"
        f'model, processor = load("{facts.run_name}")\n'
        'print(generate(model, processor, processor.chat_prompt("Why is the sky blue?"), max_tokens=200))\n```\n'
    )


def model_card(facts: CardFacts) -> str:
    source = f"[{facts.base_model}](https://huggingface.co/{facts.base_model})" if facts.base_model else "a local checkpoint"
    bits = f", {facts.bits_per_weight:.2f} bits per weight on average" if facts.bits_per_weight else ""
    kind = "MTP assistant of Gemma 4 unified" if facts.is_assistant else "Gemma 4 unified (text, image, audio, video)"
    return (
        front_matter(facts)
        + f"# {Path(facts.run_name).name}\n\n"
        + f"{kind} in MLX format, converted from {source} with mlx-gemma4's `convert/convert.py`.\n\n"
        + f"## Quantization\n\n{facts.quantization}{bits}; {facts.size_bytes / 1e9:.2f} GB of weights.\n\n"
        + f"## Use with mlx-gemma4\n\n{usage(facts)}\n"
        + "## License\n\nApache 2.0, as the base model.\n"
    )


def write_model_card(folder: Path, facts: CardFacts):
    (folder / "README.md").write_text(model_card(facts))
