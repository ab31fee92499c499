"""Turns what a user gives (text, chat messages) into model inputs, and knows which tokens end a reply."""

from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .config import ModelConfig
from .errors import Gemma4Error

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Gemma 4 closes every chat turn with this token; generation stops on it as on EOS.
END_OF_TURN_TOKEN = "<turn|>"


class Processor:
    def __init__(self, tokenizer: TokenizerWrapper, config: ModelConfig, stop_token_ids: set):
        self.tokenizer = tokenizer
        self.config = config
        self.stop_token_ids = stop_token_ids

    @classmethod
    def from_folder(cls, model_path: Path, config: ModelConfig) -> "Processor":
        if not any((model_path / name).exists() for name in TOKENIZER_FILES):
            raise Gemma4Error(f"no tokenizer in {model_path} (expected tokenizer.json or tokenizer.model)")
        from .loading import read_json

        generation = read_json(model_path / "generation_config.json") if (
            model_path / "generation_config.json"
        ).exists() else {}
        try:
            tokenizer = load_tokenizer(model_path)
        except Exception as error:  # the tokenizer libraries raise many kinds; all mean the same to a user
            raise Gemma4Error(f"cannot read the tokenizer in {model_path}: {error}") from None
        stop = set(tokenizer.eos_token_ids or []) | set(config.text_config.eos_token_id)
        generation_eos = generation.get("eos_token_id", [])
        stop |= {generation_eos} if isinstance(generation_eos, int) else set(generation_eos)
        end_of_turn = tokenizer.get_vocab().get(END_OF_TURN_TOKEN)
        if end_of_turn is not None:
            stop.add(end_of_turn)
        return cls(tokenizer, config, stop)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, **template_options) -> str:
        if self.tokenizer.chat_template is None:
            raise Gemma4Error("this tokenizer has no chat template; pass --ignore-chat-template")
        # mlx-lm's wrapper turns thinking on whenever the vocabulary has thinking tokens; the model's own template
        # (and transformers) default to off, so say so unless the caller chose.
        template_options.setdefault("enable_thinking", False)
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_options
        )

    def chat_prompt(self, user_text: str, system_prompt: Optional[str] = None, **template_options) -> str:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": user_text})
        return self.apply_chat_template(messages, **template_options)

    def encode(self, text: str) -> list:
        # A chat template already wrote <bos>; adding another would change the model's input.
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))

    def __call__(self, text: str) -> dict:
        return {"input_ids": mx.array([self.encode(text)])}
