"""Scaled dot-product attention for the decoder, in memory that does not grow with the context.

MLX's `mx.fast.scaled_dot_product_attention` has no fused kernel for Gemma's head sizes (256, 512) on CUDA, and none
on the CPU: it materializes every score, so a 2,048-token prompt chunk against 131K cached keys holds 16 heads x
2,048 x 131K float32 scores (~17 GB). Where the scores would exceed SCORES_PER_BLOCK elements, attention runs over
the keys in blocks with an online softmax (flash attention written in MLX operations): a running maximum, sum and
weighted value sum per query, rescaled as each block raises the maximum. The result is exact up to float rounding;
the transient memory is one block's scores whatever the depth.

Keys and values may also be quantized (kv_cache.py holds them as mx.quantize's (packed, scales, biases) triples);
their scores are then quantized matmuls, blockwise or not. A few queries per head (a decoding step, a speculative
verify pass) go to decode_attention.py's CUDA kernels where its rule allows. The call site does not know which path ran.
"""

from functools import partial
from typing import Optional

import mlx.core as mx

from . import decode_attention
from .cuda_backend import cuda_backend
from .attention_mask import PositionMask
from .kv_cache import Rows, is_quantized, quantization_of, row_count, take_rows
from .memory_bound import pace

# One block's scores (heads x queries x keys): 2^25 is 64 MB in bfloat16; a 2,048-query chunk of 16 heads attends to
# 1,024 keys at a time. Each block also rescales the running output (queries x head size, float32): with blocks this
# wide (2x the 12B's 512-wide full heads) that costs ~6 bytes of traffic per score against ~12 for the scores' own
# passes. A block is a paced piece (memory_bound.pace), and the pieces in flight set a prefill's peak: measured on an
# H200 (bench/results/h200-prefill-peaks-by-piece-64k.json, 12B, 65,536 tokens, one prefill each), the attention
# blocks reached the peak in every setting, and 2^25 against 2^26 took the transient from 2.20 to 1.46 GB (one
# piece ahead) and from 1.70 to 1.30 GB (two ahead), prefill 15.58 against 14.23 s and 14.64 against 14.15 s.
SCORES_PER_BLOCK = 1 << 25


def scaled_dot_product_attention(queries: mx.array, keys: Rows, values: Rows, mask) -> mx.array:
    """softmax(queries . keys^T + mask) . values with scale 1 (q_norm already normalises the queries).

    queries (batch, heads, length, head_dim); keys and values (batch, kv_heads, key_length, head_dim) or quantized
    triples; `mask` None, "causal", a boolean array broadcasting to (batch, heads, length, key_length), or an
    attention_mask.PositionMask."""
    batch, heads, length, _ = queries.shape
    total = row_count(keys)
    if length <= decode_attention.MAX_QUERIES:
        few_query_mask = array_mask(mask, length, total)
        if decode_attention.uses_kernel(queries, keys, few_query_mask):
            return decode_attention.attention(queries, keys, values, few_query_mask)
    block = max(1, SCORES_PER_BLOCK // (batch * heads * length))
    if total <= block and not is_quantized(keys):
        full_mask = mask(total) if isinstance(mask, PositionMask) else mask
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=full_mask)
    return blockwise_attention(queries, keys, values, mask, block)


def array_mask(mask, length: int, total: int) -> Optional[mx.array]:
    """`mask` as a boolean array (or None: every key visible) for `length` queries, the last of `total` keys."""
    if isinstance(mask, PositionMask):
        return mask(total)
    if isinstance(mask, str):
        # One query sees every key of a causal mask: the newest key is its own.
        return None if length == 1 else PositionMask(total - length, length, None)(total)
    return mask


def blockwise_attention(queries: mx.array, keys: Rows, values: Rows, mask, block: int) -> mx.array:
    batch, heads, length, head_dim = queries.shape
    kv_heads = (keys[0] if is_quantized(keys) else keys).shape[1]
    repeats = heads // kv_heads
    # The query heads that share a key head become rows of one matmul: each key block is read once.
    grouped = queries.reshape(batch, kv_heads, repeats * length, head_dim)
    grouped_shape = (batch, kv_heads, repeats, length, -1)
    total = row_count(keys)
    matmul = quantized_matmuls(keys, head_dim) if is_quantized(keys) else plain_matmuls
    maximum = running_sum = output = None
    for start in range(0, total, block):
        stop = min(start + block, total)
        scores = matmul(grouped, take_rows(keys, start, stop), transpose=True)
        block_mask = mask_columns(mask, length, total, start, stop)
        if block_mask is not None:
            if block_mask.ndim == 4:  # (batch, heads or 1, queries, keys): make room for the repeats axis
                block_mask = mx.expand_dims(block_mask, 2)
            scores = masked(scores.reshape(grouped_shape), block_mask).reshape(scores.shape)
        block_maximum = scores.max(axis=-1, keepdims=True).astype(mx.float32)
        new_maximum = block_maximum if maximum is None else mx.maximum(maximum, block_maximum)
        weights = exponentials(scores, new_maximum)
        block_sum = weights.sum(axis=-1, keepdims=True)
        block_output = matmul(weights, take_rows(values, start, stop), transpose=False)
        if maximum is None:
            running_sum, output = block_sum.astype(mx.float32), block_output.astype(mx.float32)
        else:
            rescale = mx.exp(maximum - new_maximum)
            running_sum = rescaled_sum(running_sum, rescale, block_sum)
            output = rescaled_sum(output, rescale, block_output)
        maximum = new_maximum
        # Both of a block's reductions over its weights must run before the next block is computed; left to the
        # graph's own order, every block's weights would be kept until the sums' chain runs at the end.
        output = mx.depends(output, running_sum)
        pace(output)
    return normalized(output, running_sum, queries).reshape(batch, heads, length, head_dim)


@partial(mx.compile, shapeless=True)
def exponentials(scores: mx.array, maximum: mx.array) -> mx.array:
    """exp(scores - maximum) computed in float32, handed out in the scores' (the model's) dtype: one pass over the
    block. (In bfloat16 the block's sum is then taken over rounded weights: an error of bfloat16's own size, as the
    weights the values are multiplied by are rounded alike.)"""
    return mx.exp(scores.astype(mx.float32) - maximum).astype(scores.dtype)


@partial(mx.compile, shapeless=True)
def rescaled_sum(total: mx.array, rescale: mx.array, block: mx.array) -> mx.array:
    """total x rescale + block in float32, one pass over the running output."""
    return total * rescale + block.astype(mx.float32)


@partial(mx.compile, shapeless=True)
def normalized(output: mx.array, running_sum: mx.array, queries: mx.array) -> mx.array:
    return (output / running_sum).astype(queries.dtype)


def plain_matmuls(x: mx.array, rows: mx.array, transpose: bool) -> mx.array:
    return x @ (rows.swapaxes(-1, -2) if transpose else rows)


def quantized_matmuls(keys: tuple, head_dim: int):
    bits, group_size = quantization_of(keys, head_dim)
    product = dequantized_rows_matmul if lacks_batched_quantized_matmul() else quantized_rows_matmul
    return partial(product, bits=bits, group_size=group_size)


def lacks_batched_quantized_matmul() -> bool:
    """MLX 0.32.4's CUDA backend has no quantized_matmul for a batch of quantized matrices, as every key head's block
    is here ("No implementation for problem shape": bench/results/h200-12b-4bit-long-context-ours.json of commit
    9ca6ad2)."""
    return cuda_backend()


def quantized_rows_matmul(x: mx.array, rows: tuple, transpose: bool, bits: int, group_size: int) -> mx.array:
    return mx.quantized_matmul(x, *rows, transpose=transpose, group_size=group_size, bits=bits)


def dequantized_rows_matmul(x: mx.array, rows: tuple, transpose: bool, bits: int, group_size: int) -> mx.array:
    """The same product through a dequantized copy of the block: transient, one block at a time; the cache stays
    quantized."""
    block = mx.dequantize(*rows, group_size=group_size, bits=bits).astype(x.dtype)
    return plain_matmuls(x, block, transpose)


@partial(mx.compile, shapeless=True)
def masked(scores: mx.array, visible: mx.array) -> mx.array:
    """Hidden scores become the dtype's most negative finite value, not -inf, so that a query with no visible key
    in a block (a sliding window's early blocks) gets exp(0) there and not NaN; the next block with a visible key
    rescales that away."""
    return mx.where(visible, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))


def mask_columns(mask, length: int, total: int, start: int, stop: int) -> Optional[mx.array]:
    """The mask's columns start:stop of `total` keys (the last `length` of them the queries' own), or None when all
    of them are visible."""
    if mask is None:
        return None
    if isinstance(mask, PositionMask):
        return mask.columns(total, start, stop)
    if isinstance(mask, str):
        assert mask == "causal", mask
        return PositionMask(total - length, length, None).columns(total, start, stop)
    return mask[..., start:stop]
