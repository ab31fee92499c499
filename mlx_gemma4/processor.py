"""Turns what a user gives (text, chat messages, images, audio, video) into model inputs, and knows which tokens end
a reply."""

from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .config import ModelConfig
from .errors import Gemma4Error
from .image_processing import PatchBudget
from .json_files import read_optional_json
from .video_processing import VIDEO_BUDGET

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Gemma 4 closes every chat turn with this token; generation stops on it as on EOS.
END_OF_TURN_TOKEN = "<turn|>"
# mm_token_type_ids values, as the reference's ProcessorMixin.create_mm_token_type_ids writes them.
MEDIA_TOKEN_TYPES = {"image_token_id": 1, "video_token_id": 2, "audio_token_id": 3}


class Processor:
    def __init__(self, tokenizer: TokenizerWrapper, config: ModelConfig, stop_token_ids: set,
                 image_budget: PatchBudget = PatchBudget(), video_budget: PatchBudget = VIDEO_BUDGET):
        self.tokenizer = tokenizer
        self.config = config
        self.stop_token_ids = stop_token_ids
        self.image_budget = image_budget
        self.video_budget = video_budget

    @classmethod
    def from_folder(cls, model_path: Path, config: ModelConfig) -> "Processor":
        if not any((model_path / name).exists() for name in TOKENIZER_FILES):
            raise Gemma4Error(f"no tokenizer in {model_path} (expected tokenizer.json or tokenizer.model)")
        generation = read_optional_json(model_path / "generation_config.json")
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
        media = read_optional_json(model_path / "processor_config.json")
        image_budget = PatchBudget.from_dict(media.get("image_processor", {}))
        video_budget = PatchBudget.from_dict({**VIDEO_BUDGET.__dict__, **media.get("video_processor", {})})
        return cls(tokenizer, config, stop, image_budget, video_budget)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, **template_options) -> str:
        if self.tokenizer.chat_template is None:
            raise Gemma4Error("this tokenizer has no chat template; pass --ignore-chat-template")
        # mlx-lm's wrapper turns thinking on whenever the vocabulary has thinking tokens; the model's own template
        # (and transformers) default to off, so say so unless the caller chose.
        template_options.setdefault("enable_thinking", False)
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_options
        )

    def chat_prompt(self, user_text: str, system_prompt: Optional[str] = None, images: int = 0, audio: int = 0,
                    videos: int = 0, **template_options) -> str:
        """One user turn; with media, the message lists one placeholder per image, video and audio clip (in that
        order) before the text, for __call__ to expand."""
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        content = user_text
        if images or audio or videos:
            content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "audio"}] * audio
            content = content + [{"type": "text", "text": user_text}]
        messages.append({"role": "user", "content": content})
        return self.apply_chat_template(messages, **template_options)

    def open_user_turn(self, user_text: str, system_prompt: Optional[str] = None, **template_options) -> str:
        """A chat prompt that ends inside the user's turn, for a prompt cache that later text continues
        (continuation_prompt), as mlx-lm's cache_prompt writes one."""
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": user_text})
        return self.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                        **template_options)

    def continuation_prompt(self, user_text: str, **template_options) -> str:
        """The rest of a turn that open_user_turn left open: `user_text`, the end of the turn and the start of the
        model's (the template's own text after a user message's content)."""
        marker = "\x00content\x00"
        templated = self.apply_chat_template([{"role": "user", "content": marker}], **template_options)
        return user_text + templated[templated.index(marker) + len(marker):]

    def encode(self, text: str) -> list:
        # A chat template already wrote <bos>; adding another would change the model's input.
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))

    def media_placeholders(self, images: Optional[list], audio: Optional[list], videos: Optional[list]) -> str:
        """The text the reference processor writes for media given without text: one placeholder per item, joined
        by spaces (its prepare_inputs_layout does so for images, and for audio)."""
        counts = {"image_token_id": len(images or []), "video_token_id": len(videos or []),
                  "audio_token_id": len(audio or [])}
        tokens = [self.tokenizer.convert_ids_to_tokens(getattr(self.config, name))
                  for name, count in counts.items() for _ in range(count)]
        if not tokens:
            raise Gemma4Error("the processor needs text, media, or both")
        return " ".join(tokens)

    def __call__(self, text: Optional[str] = None, images: Optional[list] = None, audio: Optional[list] = None,
                 videos: Optional[list] = None) -> dict:
        """Model inputs under the reference processor's names. As there, each `<|image|>`, `<|audio|>` or `<|video|>`
        in `text` stands for the next item of its list and is expanded to that item's soft tokens between begin and
        end tokens; the media arrays and `mm_token_type_ids` come with it. Without `text`, the prompt is the media's
        placeholders alone."""
        from .multimodal import expand_media

        if text is None:
            text = self.media_placeholders(images, audio, videos)
        text, media = expand_media(self, text, images, audio, videos)
        ids = self.encode(text)
        inputs = {"input_ids": mx.array([ids]), "attention_mask": mx.ones((1, len(ids)), dtype=mx.int32)}
        if media:
            types = [0] * len(ids)
            for name, kind in MEDIA_TOKEN_TYPES.items():
                token_id = getattr(self.config, name)
                types = [kind if token == token_id else old for token, old in zip(ids, types)]
            inputs["mm_token_type_ids"] = mx.array([types])
            inputs.update({name: mx.array(value) for name, value in media.items()})
        return inputs
