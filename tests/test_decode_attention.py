"""Attention for a few queries per head: which calls take the CUDA kernels (CPU tests), and what the kernels compute
(tests marked `gpu`, run on a CUDA machine: they skip where CUDA is absent)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import attention, decode_attention, decode_step
from mlx_gemma4.attention_mask import PositionMask
from mlx_gemma4.decode_attention import SWITCH, reference_attention, uses_kernel

gpu = pytest.mark.gpu


def case(heads: int, kv_heads: int, keys: int, head_dim: int, dtype=mx.bfloat16, bits=None, group_size=64, seed=0):
    """(queries, keys, values): queries of unit-norm heads times a spread, as q_norm leaves them; keys and values
    as the cache stores them, quantized triples with `bits`."""
    mx.random.seed(seed)
    queries = mx.random.normal((1, heads, 1, head_dim)) * 0.2
    rows = [mx.random.normal((1, kv_heads, keys, head_dim)).astype(dtype) for _ in range(2)]
    if bits is not None:
        rows = [tuple(mx.quantize(r, group_size=group_size, bits=bits)) for r in rows]
    return queries.astype(dtype), rows[0], rows[1]


@pytest.fixture
def on_cuda(monkeypatch):
    """The rule as it runs on a CUDA machine, with the kernels replaced by the float32 reference and counted."""
    calls = []

    def counted(queries, keys, values, mask):
        calls.append(queries.shape)
        return reference_attention(queries, keys, values, mask)

    monkeypatch.setattr(decode_attention, "cuda_backend", lambda: True)
    monkeypatch.setattr(decode_attention, "attention", counted)
    monkeypatch.setenv(SWITCH, "1")
    return calls


def test_rule_takes_a_few_queries_per_head_at_head_sizes_of_256_and_512(on_cuda):
    for heads, kv_heads, head_dim in ((16, 8, 256), (16, 1, 512)):
        queries, keys, _ = case(heads, kv_heads, 40, head_dim)
        assert uses_kernel(queries, keys, None)
        assert uses_kernel(queries, keys, mx.arange(40) < 30)
    queries, keys, _ = case(16, 8, 40, 256)
    few = mx.concatenate([queries] * decode_attention.MAX_QUERIES, axis=2)
    assert uses_kernel(few, keys, None)
    assert uses_kernel(few, keys, mx.arange(40) < 30)  # one mask for every query
    assert uses_kernel(few, keys, mx.arange(40) < mx.arange(16, 32)[:, None])  # a row for each
    assert uses_kernel(few, keys, (mx.arange(40) < mx.arange(16, 32)[:, None])[None, None])
    assert not uses_kernel(mx.concatenate([few, queries], axis=2), keys, None)  # one query too many
    assert not uses_kernel(few, keys, mx.ones((2, 16, 40), dtype=mx.bool_))  # rows for another number of queries
    assert not uses_kernel(queries.astype(mx.float32), keys.astype(mx.float32), None)
    assert not uses_kernel(case(4, 2, 40, 64)[0], case(4, 2, 40, 64)[1], None)  # head size 64
    assert not uses_kernel(queries, keys, mx.ones((1, 16, 1, 40), dtype=mx.bool_) > 0)  # a mask per head
    assert uses_kernel(*case(16, 1, 40, 256)[:2], None)
    assert not uses_kernel(*case(32, 1, 40, 256)[:2], None)  # 32 warps a block: too few registers a thread


def test_rule_takes_quantized_caches_at_4_and_8_bits(on_cuda):
    for bits in (4, 8):
        queries, keys, _ = case(16, 8, 40, 256, bits=bits)
        assert uses_kernel(queries, keys, None)


def test_rule_leaves_long_plain_caches_to_mlx_but_not_quantized_ones(on_cuda):
    keys = decode_attention.MAX_PLAIN_KEYS
    queries, plain, _ = case(16, 1, keys, 512)
    assert uses_kernel(queries, plain, None)
    queries, plain, _ = case(16, 1, keys + 1, 512)
    assert not uses_kernel(queries, plain, None)
    queries, quantized, _ = case(16, 1, keys + 1, 512, bits=8)
    assert uses_kernel(queries, quantized, None)


def test_the_kernels_are_on_unless_switched_off(on_cuda, monkeypatch):
    queries, keys, _ = case(16, 8, 40, 256)
    monkeypatch.setenv(SWITCH, "0")
    assert not uses_kernel(queries, keys, None)
    monkeypatch.setattr(decode_attention, "cuda_backend", lambda: False)
    monkeypatch.setenv(SWITCH, "1")
    assert not uses_kernel(queries, keys, None)


def test_attention_sends_decoding_steps_and_verify_passes_to_the_kernels_and_prompt_chunks_to_mlx(on_cuda):
    queries, keys, values = case(16, 8, 40, 256)
    position_mask = PositionMask(39, 1, 16)  # a sliding layer's window, as a position mask
    one = attention.scaled_dot_product_attention(queries, keys, values, position_mask)
    assert on_cuda == [queries.shape]
    expected = reference_attention(queries, keys, values, position_mask(40))
    assert mx.array_equal(one, expected)
    attention.scaled_dot_product_attention(queries, keys, values, "causal")
    assert len(on_cuda) == 2
    few = mx.concatenate([queries * (i + 1) for i in range(3)], axis=2)
    got = attention.scaled_dot_product_attention(few, keys, values, "causal")  # each query sees the keys up to its own
    assert len(on_cuda) == 3
    for i in range(3):
        alone = reference_attention(few[:, :, i:i + 1], keys[:, :, :38 + i], values[:, :, :38 + i], None)
        assert mx.allclose(got[:, :, i:i + 1], alone, atol=1e-6)
    chunk = mx.concatenate([queries] * (decode_attention.MAX_QUERIES + 1), axis=2)
    attention.scaled_dot_product_attention(chunk, keys, values, "causal")
    assert len(on_cuda) == 3


def test_launch_plan_cuts_buffers_of_nearby_lengths_into_the_same_spans():
    """A verify pass may see a full layer's buffer after it grew, where the one-token steps it must equal saw it
    before: every span both lengths share must hold the same keys."""
    for kv_heads in (1, 8):
        for keys in (1, 40, 1024, 1042, 4096, 9000, 70000, 262144):
            plan = decode_attention.launch_plan(keys, kv_heads, 16 // kv_heads)
            grown = decode_attention.launch_plan(keys + decode_step.CAPACITY_STEP, kv_heads, 16 // kv_heads)
            assert plan["per_span"] & (plan["per_span"] - 1) == 0 and plan["per_span"] >= decode_attention.MIN_SPAN
            assert (plan["spans"] - 1) * plan["per_span"] < keys <= plan["spans"] * plan["per_span"]
            assert kv_heads * plan["spans"] <= 2 * decode_attention.TARGET_BLOCKS + kv_heads
            assert plan["spans"] <= decode_attention.MAX_SPANS
            if keys + decode_step.CAPACITY_STEP <= 16 * decode_attention.TARGET_BLOCKS // kv_heads:
                assert grown["per_span"] == plan["per_span"]


def test_reference_matches_mlx_attention_on_this_backend():
    """The tests below hold the kernels to reference_attention; it must itself be attention."""
    queries, keys, values = case(4, 2, 50, 64, dtype=mx.float32)
    mask = mx.arange(50) < 37
    expected = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)
    assert mx.allclose(reference_attention(queries, keys, values, mask), expected, atol=1e-5)


# The kernels sum in float32 and round once, to the output dtype, as the reference does: they differ from it by the
# float32 sums' order, which moves an output across a rounding boundary at most, one ulp. The outputs (weighted means
# of unit-normal values) stay under 2 in size, where bfloat16's ulp is 2^-7 and float16's 2^-10: two ulps allowed.
# Not measured: the H200 runs of these tests (bench/results/h200-gpu-tests-fused.log) record passes, not differences.
TOLERANCE = {mx.bfloat16: 1.6e-2, mx.float16: 2e-3}

SHAPES = [  # (heads, kv_heads, keys, head size): the 12B's sliding and full layers, short and deep, and odd counts
    (16, 8, 1024, 256), (16, 8, 1, 256), (16, 8, 77, 256), (16, 1, 1024, 512), (16, 1, 4099, 512), (16, 1, 70000, 512),
]


@gpu
@pytest.mark.parametrize("heads,kv_heads,keys,head_dim", SHAPES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_kernels_match_the_reference(heads, kv_heads, keys, head_dim, dtype):
    queries, key_rows, value_rows = case(heads, kv_heads, keys, head_dim, dtype)
    for mask in (None, mx.arange(keys) <= keys // 2, mx.random.uniform(shape=(keys,)) < 0.3):
        if mask is not None and not mask.any().item():
            continue
        got = decode_attention.attention(queries, key_rows, value_rows, mask)
        expected = reference_attention(queries, key_rows, value_rows, mask)
        assert got.shape == queries.shape and got.dtype == dtype
        assert mx.abs(got.astype(mx.float32) - expected.astype(mx.float32)).max().item() < TOLERANCE[dtype]


@gpu
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
@pytest.mark.parametrize("heads,kv_heads,keys,head_dim", [(16, 8, 1024, 256), (16, 1, 3000, 512)])
def test_kernels_read_quantized_caches(bits, group_size, heads, kv_heads, keys, head_dim):
    queries, key_rows, value_rows = case(heads, kv_heads, keys, head_dim, bits=bits, group_size=group_size)
    mask = mx.arange(keys) < keys - 5
    got = decode_attention.attention(queries, key_rows, value_rows, mask)
    expected = reference_attention(queries, key_rows, value_rows, mask)
    assert mx.abs(got.astype(mx.float32) - expected.astype(mx.float32)).max().item() < TOLERANCE[mx.bfloat16]


@gpu
def test_kernels_run_inside_a_compiled_function():
    queries, key_rows, value_rows = case(16, 1, 2048, 512)
    mask = mx.arange(2048) < 1500
    compiled = mx.compile(lambda q, k, v, m: decode_attention.attention(q, k, v, m))
    expected = decode_attention.attention(queries, key_rows, value_rows, mask)
    assert mx.array_equal(compiled(queries, key_rows, value_rows, mask), expected)


@gpu
@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("heads,kv_heads,keys,head_dim", [(16, 8, 1042, 256), (16, 1, 3072, 512)])
def test_a_verify_pass_gives_each_query_what_a_call_of_its_own_gives_bit_for_bit(bits, heads, kv_heads, keys,
                                                                                  head_dim):
    """The speculative loop's promise: a pass of k + 1 queries, each with its own mask row, equals k + 1 one-query
    calls exactly; and a full layer's buffer grown by a capacity step (its new rows hidden) changes nothing either
    (a sliding layer's ring never grows)."""
    queries, key_rows, value_rows = case(heads, kv_heads, keys, head_dim, bits=bits)
    count = 7
    few = (mx.random.normal((1, heads, count, head_dim), key=mx.random.key(5)) * 0.2).astype(mx.bfloat16)
    positions = mx.arange(keys - 2 * count, keys - count)
    masks = mx.arange(keys) <= positions[:, None]
    got = decode_attention.attention(few, key_rows, value_rows, masks)
    assert mx.abs(got.astype(mx.float32) - reference_attention(few, key_rows, value_rows, masks)
                  .astype(mx.float32)).max().item() < TOLERANCE[mx.bfloat16]
    grown = [mx.concatenate([part, part[:, :, :decode_step.CAPACITY_STEP]], axis=2)
             for part in ((key_rows,) if bits is None else key_rows) + ((value_rows,) if bits is None else value_rows)]
    grown_keys, grown_values = (grown[0], grown[1]) if bits is None else (tuple(grown[:3]), tuple(grown[3:]))
    grown_masks = mx.arange(keys + decode_step.CAPACITY_STEP) <= positions[:, None]
    for query in range(count):
        alone = decode_attention.attention(few[:, :, query:query + 1], key_rows, value_rows, masks[query])
        assert mx.array_equal(got[:, :, query:query + 1], alone)
        if kv_heads > 1:
            continue
        in_grown = decode_attention.attention(few[:, :, query:query + 1], grown_keys, grown_values, grown_masks[query])
        assert mx.array_equal(in_grown, alone)


def emulated_span_kernel(quantized: bool, masked: bool):
    """The span kernel's contract in NumPy, read from its launch arguments: each block (query, key head, span of
    PER_SPAN keys) hands back its query heads' maximum score, sum of exponentials and weighted value sum over its
    span's visible keys."""

    def launch(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        ints = dict(template)
        head_dim, repeats, kv_heads, per_span = ints["D"], ints["R"], ints["KVH"], ints["PER_SPAN"]
        parts = 3 if quantized else 1
        queries, keys, values = inputs[0], inputs[1:1 + parts], inputs[1 + parts:1 + 2 * parts]
        count = queries.shape[2]
        spans = grid[0] // threadgroup[0] // kv_heads // count
        mask = np.array(inputs[-1]) if masked else None
        assert mask is None or mask.shape == (count, (keys[0]).shape[2])

        def rows(stored):
            if quantized:
                packed, scales, biases = stored  # dequantized in float32, as the kernel does
                return np.array(mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32),
                                              group_size=ints["GROUP"], bits=ints["BITS"]))
            return np.array(stored[0].astype(mx.float32))

        k, v = rows(keys)[0], rows(values)[0]
        q = np.array(queries.astype(mx.float32))[0].reshape(kv_heads, repeats, count, head_dim)
        total = k.shape[1]
        assert (spans - 1) * per_span < total <= spans * per_span
        acc = np.zeros((count, kv_heads, spans, repeats, head_dim), np.float32)
        ml = np.zeros((count, kv_heads, spans, repeats, 2), np.float32)
        ml[..., 0] = -np.inf
        for query in range(count):
            for head in range(kv_heads):
                for span in range(spans):
                    seen = np.arange(span * per_span, min(total, (span + 1) * per_span))
                    if mask is not None:
                        seen = seen[mask[query, seen]]
                    if seen.size:
                        scores = q[head, :, query] @ k[head, seen].T
                        top = scores.max(axis=-1, keepdims=True)
                        weights = np.exp(scores - top)
                        acc[query, head, span] = weights @ v[head, seen]
                        ml[query, head, span, :, 0], ml[query, head, span, :, 1] = top[:, 0], weights.sum(-1)
        assert [acc.shape, ml.shape] == [tuple(shape) for shape in output_shapes]
        return [mx.array(acc), mx.array(ml)]

    return launch


def emulated_merge(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
    """The merge kernel's contract: a block of 8 warps for each query, query head and 32 of its numbers."""
    span_acc, span_ml = (np.array(a) for a in inputs)
    _, heads, count, head_dim = output_shapes[0]
    assert dict(template) == {"D": head_dim, "R": span_acc.shape[3]}
    assert threadgroup == (256, 1, 1) and grid == (count * heads * head_dim // 32 * 256, 1, 1)
    top = span_ml[..., 0].max(axis=2, keepdims=True)
    weights = np.where(np.isinf(span_ml[..., 0]), 0.0, np.exp(span_ml[..., 0] - top))
    out = (weights[..., None] * span_acc).sum(2) / (weights * span_ml[..., 1]).sum(2)[..., None]
    # (queries, key heads, repeats, head size) -> (1, heads, queries, head size)
    out = out.reshape(count, heads, head_dim).transpose(1, 0, 2)[None]
    return [mx.array(out).astype(output_dtypes[0])]


@pytest.mark.parametrize("bits", [None, 8])
def test_kernel_launches_agree_with_the_reference(monkeypatch, bits):
    """The Python side of the two launches (inputs in order, template ints, grid, output shapes), with each kernel
    emulated from its launch arguments, against reference_attention; spans several keys long, a masked tail, and a
    verify pass's queries, each with its own mask row."""
    monkeypatch.setattr(decode_attention, "span_kernel", emulated_span_kernel)
    monkeypatch.setattr(decode_attention, "merge_kernel", lambda: emulated_merge)
    for heads, kv_heads, keys, head_dim in ((16, 8, 300, 256), (16, 1, 2000, 512)):
        queries, key_rows, value_rows = case(heads, kv_heads, keys, head_dim, bits=bits)
        few = mx.concatenate([queries, -queries, 2 * queries], axis=2)
        for probe, mask in ((queries, None), (queries, mx.arange(keys) < keys - 37), (few, None),
                            (few, mx.arange(keys) <= mx.arange(keys - 40, keys - 37)[:, None])):
            got = decode_attention.attention(probe, key_rows, value_rows, mask)
            expected = reference_attention(probe, key_rows, value_rows, mask)
            assert got.shape == expected.shape
            assert mx.abs(got.astype(mx.float32) - expected.astype(mx.float32)).max().item() < 1.6e-2
