"""The public generation API: stream_generate (a generator of GenerationResponses: text, token, statistics) and
generate, over plain decoding (decoding.py) or speculative decoding with the MTP assistant (speculative.py)."""

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import mlx.core as mx
from mlx_lm.generate import wired_limit
from mlx_lm.sample_utils import make_sampler

from .decoding import DEFAULT_MAX_TOKENS, DEFAULT_PREFILL_STEP_SIZE, generate_step, generation_stream
from .errors import Gemma4Error
from .kv_cache import kv_quantization
from .speculative import speculative_steps


@dataclass
class GenerationResponse:
    text: str  # the new piece of text; never half a UTF-8 character
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    time_to_first_token: float  # seconds
    peak_memory: float  # GB
    finish_reason: Optional[str] = None  # "stop" (end of turn or EOS), "length" (max tokens) or None


def context_length(model) -> int:
    return model.config.text_config.max_position_embeddings


def prompt_ids(processor, prompt: Union[str, list], vocab_size: int) -> list:
    """The prompt's token ids (text is encoded), checked: an id outside the vocabulary would read past the embedding
    table (MLX's gather does not check its indices)."""
    ids = processor.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise Gemma4Error("the prompt is empty")
    if any(not 0 <= token < vocab_size for token in ids):
        raise Gemma4Error(f"prompt token ids must be in [0, {vocab_size})")
    return ids


def stream_generate(
    model,
    processor,
    prompt: Union[str, list],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
    sampler: Optional[Callable] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_cache: Optional[list] = None,
    draft_model=None,
    num_draft_tokens: Optional[int] = None,
    draft_statistics=None,
    images: Optional[list] = None,
    audio: Optional[list] = None,
    video=None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
) -> Iterator[GenerationResponse]:
    """Streams the reply to `prompt` (text, already chat-formatted if wanted, or token ids) as GenerationResponses.
    `images`, `audio` (lists of paths, bytes, PIL images or arrays) and `video` (a path) fill the prompt's
    placeholders, one each, as Processor.__call__ expands them.

    With `draft_model` (a drafter.Drafter) decoding is speculative (speculative.py): `num_draft_tokens` fixes the draft
    length (None adapts it), `draft_statistics` (a speculative.DraftStatistics) collects acceptance figures.

    `kv_bits` (4 or 8), `kv_group_size` and `quantized_kv_start` quantize the key/value caches as mlx-lm's options
    do, sliding-window layers included."""
    if max_tokens < 1 or prefill_step_size < 1:
        raise Gemma4Error("max_tokens and prefill_step_size must be at least 1")
    kv_quantization(kv_bits, kv_group_size, quantized_kv_start)  # bad values fail before anything runs
    quantization = dict(kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start)
    media = {}
    if images or audio or video is not None:
        from .multimodal import media_prompt

        ids, media = media_prompt(model, processor, prompt, images, audio, video)
    else:
        ids = prompt_ids(processor, prompt, model.config.text_config.vocab_size)
    past = prompt_cache[0].offset if prompt_cache else 0
    limit = context_length(model)
    if past + len(ids) >= limit:
        raise Gemma4Error(f"the prompt has {past + len(ids)} tokens; the model's context holds {limit}")
    max_tokens = min(max_tokens, limit - past - len(ids))
    if seed is not None:
        mx.random.seed(seed)
    if draft_model is not None:
        tokens = speculative_steps(
            mx.array(ids), model, draft_model, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
            min_p=min_p, sampler=sampler, num_draft_tokens=num_draft_tokens, prefill_step_size=prefill_step_size,
            prompt_cache=prompt_cache, statistics=draft_statistics, **quantization, **media,
        )
    else:
        sampler = sampler or make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
        tokens = generate_step(mx.array(ids), model, max_tokens=max_tokens, sampler=sampler,
                               prefill_step_size=prefill_step_size, prompt_cache=prompt_cache, **quantization,
                               **media)
    with wired_limit(model, [generation_stream]):
        yield from stream_responses(tokens, processor, len(ids), max_tokens)


def stream_responses(tokens: Iterator, processor, prompt_tokens: int, max_tokens: int) -> Iterator[GenerationResponse]:
    """Detokenizes (token, logprobs[, from_draft]) steps into responses with running statistics."""
    detokenizer = processor.tokenizer.detokenizer
    detokenizer.reset()
    mx.reset_peak_memory()
    start = time.perf_counter()
    for count, step in enumerate(tokens, start=1):
        token, logprobs = step[0], step[1]
        from_draft = step[2] if len(step) > 2 else False
        now = time.perf_counter()
        if count == 1:
            time_to_first_token = now - start
            decode_start = now
        finish_reason = None
        if token in processor.stop_token_ids:
            finish_reason = "stop"
        else:
            detokenizer.add_token(token)
            if count == max_tokens:
                finish_reason = "length"
        if finish_reason:
            detokenizer.finalize()
        decode_time = now - decode_start
        yield GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=prompt_tokens,
            prompt_tps=prompt_tokens / time_to_first_token,
            generation_tokens=count,
            generation_tps=(count - 1) / decode_time if decode_time > 0 else 0.0,
            time_to_first_token=time_to_first_token,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
        )
        if finish_reason:
            return


def generate(model, processor, prompt: Union[str, list], **options) -> str:
    """The whole reply as one string; `options` as for stream_generate."""
    return "".join(response.text for response in stream_generate(model, processor, prompt, **options))
