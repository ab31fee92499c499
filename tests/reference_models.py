"""Tiny reference checkpoints made with the transformers classes (the spec), plus a tiny Gemma-4-style tokenizer.

Every weight is random, norm weights and layer scalars included, so that a wrong norm, scale or scalar shows.
"""

import json
from pathlib import Path

import numpy as np

# Gemma 4 special tokens, at ids other than the real vocabulary's so nothing can lean on the real ids.
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>",
    "<|channel>", "<channel|>", "<|think|>",
]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

# A Gemma-4-shaped chat template: turns open with <|turn>role and close with <turn|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if enable_thinking is defined and enable_thinking %}<|turn>system\n<|think|><turn|>\n{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% elif item['type'] == 'image' %}<|image|>{% elif item['type'] == 'audio' %}<|audio|>"
    "{% elif item['type'] == 'video' %}<|video|>{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

# Our float32 logits against the reference's exact (float64) ones. Measured at most 2.0e-4 on one x86 CPU (the
# cached-decode test at the scaled-RoPE shape, where transformers' own float32 run strays 8.5e-5), 6.1e-5 with media.
# The error is float32 rounding that every random layer amplifies (test_decoder_parity.py): 2.5x headroom.
FLOAT32_TOLERANCE = 5e-4

TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Gemma runs on Apple Silicon with MLX. "
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Café, naïve, 東京, 🙂 emoji and accents. "
    "A model reads tokens, attends to its past, and writes the next token one at a time. "
) * 4


def text_config(**overrides) -> dict:
    """A small decoder with both attention kinds and odd sizes; override any field."""
    config = dict(
        hidden_size=48, intermediate_size=72, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, global_head_dim=20, num_global_key_value_heads=1, attention_k_eq_v=True, vocab_size=389,
        sliding_window=6, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                     "full_attention", "sliding_attention", "full_attention"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    config.update(overrides)
    return config


def randomize(model, seed: int, scale: float = 0.07):
    """Every parameter random: matrices around 0, norm weights and layer scalars around 1."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim == 1 and "norm" in name or name.endswith("ln1.weight") or name.endswith("ln2.weight"):
                parameter.copy_(1.0 + 0.3 * noise)
            else:
                parameter.copy_(scale * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.copy_(0.6 + torch.rand(buffer.shape, generator=generator))


def build_reference_model(text_overrides=None, vision=True, audio=True, seed=0, token_ids=None):
    """A random Gemma4UnifiedForConditionalGeneration in float32 eager mode."""
    import torch
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    torch.manual_seed(seed)
    config = Gemma4UnifiedConfig(
        text_config=text_config(**(text_overrides or {})),
        vision_config=dict(mm_embed_dim=40, output_proj_dims=40, mm_posemb_size=24) if vision else None,
        audio_config=dict(audio_embed_dim=640) if audio else None,
        tie_word_embeddings=(text_overrides or {}).get("tie_word_embeddings", True),
        **(token_ids or {}),
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    model = Gemma4UnifiedForConditionalGeneration(config).eval()
    randomize(model, seed)
    return model


# Characters of the training text that get tokens of their own (the rest fall back to bytes).
ALPHABET_SIZE = 40


def save_tokenizer(folder: Path, vocab_size: int, special_tokens=SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE):
    """A byte-fallback BPE tokenizer shaped like Gemma's (SentencePiece-style ▁ spaces), `vocab_size` entries, the
    same in every process (deterministic_bpe)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Replace(" ", "▁")
    pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    words = [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(TRAINING_TEXT))]
    vocab, merges = deterministic_bpe(words, special_tokens + BYTE_TOKENS, vocab_size)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(special_tokens)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=special_tokens[5:],
    )
    wrapped.chat_template = chat_template
    wrapped.save_pretrained(str(folder))
    return wrapped


def deterministic_bpe(words: list, first_tokens: list, vocab_size: int) -> tuple:
    """({token: id}, merges) learned from `words` by byte-pair encoding, ties always broken by the pair's text:
    the `tokenizers` trainer breaks them in its hash maps' order, which changes from process to process, and so did
    every fixture tokenizer's vocabulary (and every generated text with it)."""
    counts = {}
    for word in words:
        counts[word] = counts.get(word, 0) + 1
    characters = {}
    for word, count in counts.items():
        for character in word:
            characters[character] = characters.get(character, 0) + count
    alphabet = sorted(sorted(characters, key=lambda c: (-characters[c], c))[:ALPHABET_SIZE])
    vocab = {token: index for index, token in enumerate(first_tokens + alphabet)}
    pieces = {word: [c if c in vocab else None for c in word] for word in counts}
    merges = []
    while len(vocab) < vocab_size:
        pairs = {}
        for word, symbols in pieces.items():
            for a, b in zip(symbols, symbols[1:]):
                if a is not None and b is not None:
                    pairs[a, b] = pairs.get((a, b), 0) + counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        for word, symbols in pieces.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            pieces[word] = merged
    return vocab, merges


def special_token_ids(folder: Path) -> dict:
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    added = {t["content"]: t["id"] for t in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}
    vocab.update(added)
    return vocab


def save_reference_checkpoint(folder: Path, text_overrides=None, vision=True, audio=True, seed=0, **tokenizer_options):
    """Tokenizer first (its special ids become the config's), then the random reference model. Returns the model.
    `tokenizer_options` go to save_tokenizer (more special tokens, another chat template)."""
    folder = Path(folder)
    vocab_size = (text_overrides or {}).get("vocab_size", text_config()["vocab_size"])
    save_tokenizer(folder, vocab_size, **tokenizer_options)
    ids = special_token_ids(folder)
    token_ids = dict(
        boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"], image_token_id=ids["<|image|>"],
        boa_token_id=ids["<|audio>"], eoa_token_index=ids["<audio|>"], audio_token_id=ids["<|audio|>"],
        video_token_id=ids["<|video|>"],
    )
    overrides = dict(pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"])
    overrides.update(text_overrides or {})
    model = build_reference_model(overrides, vision=vision, audio=audio, seed=seed, token_ids=token_ids)
    model.save_pretrained(str(folder))
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [ids["<eos>"], ids["<turn|>"]], "bos_token_id": ids["<bos>"]})
    )
    return model


def reference_logits(model, input_ids: np.ndarray, dtype=None, **inputs) -> np.ndarray:
    """The reference's logits, as float32 numbers, computed in float64 (`dtype` to compute in another): the exact
    function. At these random weights the reference's own float32 run strays from it by up to ~1e-4, as much as ours
    does: rounding noise that every layer amplifies (tests/test_decoder_parity.py says more), so a float32 reference
    would put our tolerance at the noise floor of two float32 computations."""
    import copy

    import torch

    dtype = dtype or torch.float64
    model = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        return model(input_ids=torch.from_numpy(np.asarray(input_ids)), **tensors).logits.float().numpy()
