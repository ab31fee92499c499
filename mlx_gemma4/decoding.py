"""Plain decoding as a generator: chunked prefill, then one sampled token per step, the next step queued before the
current token is handed out (`mx.async_eval`), as mlx-lm's `generate_step` does.

Whenever a token is handed out, the caches hold exactly the prompt and every token handed out so far, that one
included: its step is queued before it is yielded. However the caller stops (a stop token, max_tokens, or leaving
the loop), `prompt_cache` is then ready for the next turn."""

from typing import Callable, Iterator, Optional

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from .decode_step import decode_step
from .kv_cache import FullCache, kv_quantization
from .memory_bound import PREFILL_TRANSIENT_BYTES, transient_memory_bound

DEFAULT_PREFILL_STEP_SIZE = 2048
DEFAULT_MAX_TOKENS = 256
# mlx keeps freed buffers for reuse; returning them now and then keeps a long generation's footprint flat.
CLEAR_CACHE_EVERY = 256
# Rows reserved beyond a long prompt in full layers' buffers, for the reply (more are added as it grows).
REPLY_ROWS_RESERVED = 1024

generation_stream = mx.new_stream(mx.default_device())


def prefill_chunks(length: int, step: int, block_ids: Optional[mx.array] = None) -> list:
    """(start, end) pieces of the prompt, each at most `step` long, except that a vision block (tokens that attend
    to each other both ways) is never cut: a boundary inside one moves to the block's start, or its end."""
    ids = None if block_ids is None else block_ids.reshape(-1).tolist()
    bounds, start = [], 0
    while start < length:
        end = min(start + step, length)
        if ids is not None and end < length and ids[end] >= 0 and ids[end] == ids[end - 1]:
            block_start = end
            while block_start > start and ids[block_start - 1] == ids[end]:
                block_start -= 1
            if block_start > start:
                end = block_start
            else:
                while end < length and ids[end] == ids[start]:
                    end += 1
        bounds.append((start, end))
        start = end
    return bounds


def sample_last(logits: mx.array, sampler: Callable) -> tuple:
    """(token (1,), log-probabilities (1, vocab)) at the last position of `logits` (1, length, vocab)."""
    logprobs = logits[:, -1, :] - mx.logsumexp(logits[:, -1, :], axis=-1, keepdims=True)
    return sampler(logprobs), logprobs


def prefill(
    prompt: mx.array,
    model,
    cache: list,
    sampler: Callable,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    input_embeddings: Optional[mx.array] = None,
    block_ids: Optional[mx.array] = None,
) -> tuple:
    """Runs `prompt` (1-D token ids) through `model` into `cache`, chunk by chunk, and queues the first token: returns
    (token (1,), log-probabilities (vocab,)), not yet evaluated. `input_embeddings` (1, length, hidden) replaces the
    token embeddings (multimodal prompts); `block_ids` (1, length) marks vision blocks for their attention mask."""
    forward = chunk_forward(model, cache, prompt, input_embeddings, block_ids)
    with mx.stream(generation_stream), transient_memory_bound(PREFILL_TRANSIENT_BYTES) as bound:
        chunks = prefill_chunks(prompt.size, prefill_step_size, block_ids)
        evaluate_chunks(forward, chunks[:-1], cache, prompt.size, bound)
        bound()
        token, logprobs = sample_last(forward(*chunks[-1]), sampler)
        logprobs = logprobs.squeeze(0)
        # Queued while the bound holds: MLX applies the memory limit as it hands the chunk to the device.
        mx.async_eval(token, logprobs)
    return token, logprobs


def chunk_forward(model, cache: list, ids: mx.array, input_embeddings: Optional[mx.array] = None,
                  block_ids: Optional[mx.array] = None) -> Callable:
    """forward(start, end): `model` over positions start:end of a prompt (1-D `ids`, or its `input_embeddings`) into
    `cache`, returning the last position's logits."""

    def forward(start: int, end: int):
        chunk_blocks = None if block_ids is None else block_ids[:, start:end]
        if input_embeddings is not None:
            return model(cache=cache, input_embeddings=input_embeddings[:, start:end], logits_to_keep=1,
                         block_ids=chunk_blocks)
        return model(ids[None, start:end], cache=cache, logits_to_keep=1, block_ids=chunk_blocks)

    return forward


def evaluate_chunks(forward: Callable, chunks: list, cache: list, length: int, bound: Callable):
    """Runs forward(start, end) for each of `chunks` (pieces of a prompt of `length` tokens) into `cache`, each
    evaluated before the next is built, its memory in flight bounded by `bound()` (memory_bound.py)."""
    for index, (start, end) in enumerate(chunks):
        bound()
        forward(start, end)
        mx.eval([c.arrays() for c in cache])
        if index == 0:
            # Room for the whole prompt at once: growing chunk by chunk would copy the buffers every time. Made on
            # its own, so that the chunk's bound is not taken up by the new buffers.
            reserve_rows(cache, cache[0].offset + length - end + REPLY_ROWS_RESERVED)
        mx.clear_cache()


def reserve_rows(cache: list, capacity: int):
    """Grows every full layer's buffer to `capacity` rows, one layer at a time: while a buffer grows, its old and
    new copies are both live."""
    for layer_cache in cache:
        if isinstance(layer_cache, FullCache):
            layer_cache.reserve(capacity)
            mx.eval(layer_cache.arrays())


def quantize_caches(cache: list, kv_bits: Optional[int], kv_group_size: int, quantized_kv_start: int):
    """mlx-lm's KV quantization options, applied to every cache (a prompt cache handed in too): with kv_bits, keys
    and values are quantized once a cache holds quantized_kv_start positions."""
    quantization = kv_quantization(kv_bits, kv_group_size, quantized_kv_start)
    if quantization is not None:
        for layer_cache in cache:
            layer_cache.quantization = quantization


def generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Optional[Callable] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_cache: Optional[list] = None,
    input_embeddings: Optional[mx.array] = None,
    block_ids: Optional[mx.array] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
) -> Iterator[tuple]:
    """Yields (token, logprobs) for `prompt` (1-D token ids); the arguments as prefill's, and mlx-lm's KV
    quantization options (quantize_caches)."""
    cache = model.make_cache() if prompt_cache is None else prompt_cache
    quantize_caches(cache, kv_bits, kv_group_size, quantized_kv_start)
    sampler = sampler or make_sampler(0.0)
    token, logprobs = prefill(prompt, model, cache, sampler, prefill_step_size, input_embeddings, block_ids)
    step = decode_step(model, cache)
    for produced in range(1, max_tokens + 1):
        # Queued for every token, the last one too, so that the caches hold each token handed out.
        with mx.stream(generation_stream):
            next_token, next_logprobs = sample_last(step(token[:, None]), sampler)
            next_logprobs = next_logprobs.squeeze(0)
        mx.async_eval(next_token, next_logprobs)
        yield token.item(), logprobs
        if produced % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
        token, logprobs = next_token, next_logprobs
