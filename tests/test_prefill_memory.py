"""A prompt chunk's transient memory does not grow with the context: attention runs over the cached keys in blocks
(attention.py) instead of materializing every score."""

import gc

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler

from mlx_gemma4 import attention, memory_bound
from mlx_gemma4.decoding import prefill, quantize_caches
from mlx_gemma4.loading import load
from mlx_gemma4.memory_bound import PREFILL_TRANSIENT_BYTES
from reference_models import save_reference_checkpoint

CHUNK = 128
BLOCK_KEYS = 64
# Measured: 1.02-1.08 MB at 512 tokens, 1.04-1.09 MB at 2,048; scores materialized whole: 1.69 and 5.05 MB; the full
# layers' buffers grown through a concatenation with zeros: 1.12 and 1.56 MB.
GROWTH_BOUND = 1.25
# What a 2,048-token prefill leaves live, in chunks of 128 against 512 tokens. Measured: 0.4 KB apart (8-bit KV: 2.3
# KB); 288 KB apart (8-bit KV: 211 KB) with the sliding rings' writes left queued, each keeping its chunk's keys and
# values.
LIVE_DIFFERENCE_BOUND = 32_000


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefill_memory")
    save_reference_checkpoint(folder, dict(max_position_embeddings=4096), vision=False, audio=False, seed=3)
    return load(folder)[0]


def transient_prefill_bytes(model, depth: int) -> int:
    """Peak memory of a prefill beyond the weights and the caches it fills."""
    weights = sum(value.nbytes for _, value in tree_flatten(model.parameters()))
    cache = model.make_cache()
    prompt = mx.random.randint(10, 300, (depth,), key=mx.random.key(depth))
    mx.eval(prompt)
    mx.clear_cache()
    mx.reset_peak_memory()
    token, _ = prefill(prompt, model, cache, make_sampler(0.0), CHUNK)
    mx.eval(token)
    return mx.get_peak_memory() - weights - sum(c.nbytes for c in cache)


def test_transient_prefill_memory_does_not_grow_with_depth(model, monkeypatch):
    heads = model.config.text_config.num_attention_heads
    monkeypatch.setattr(attention, "SCORES_PER_BLOCK", heads * CHUNK * BLOCK_KEYS)
    shallow, deep = transient_prefill_bytes(model, 512), transient_prefill_bytes(model, 2048)
    print(f"transient prefill memory: {shallow / 1e6:.2f} MB at 512 tokens, {deep / 1e6:.2f} MB at 2,048")
    assert deep <= GROWTH_BOUND * shallow


class LimitRecorder:
    """Stands in for the model during a prefill: records the memory limit and the live memory at each chunk, then
    runs the model (or raises at chunk `fail_at`)."""

    def __init__(self, model, fail_at=None):
        self.model, self.fail_at, self.seen = model, fail_at, []

    def __call__(self, *args, **kwargs):
        self.seen.append((mx.get_memory_limit(), mx.get_active_memory()))
        if len(self.seen) == self.fail_at:
            raise RuntimeError("chunk failed")
        return self.model(*args, **kwargs)


def test_prefill_bounds_each_chunks_memory_in_flight_and_restores_the_limit(model):
    before = mx.get_memory_limit()
    recorder = LimitRecorder(model)
    prompt = mx.random.randint(10, 300, (5 * CHUNK,), key=mx.random.key(1))
    token, _ = prefill(prompt, recorder, model.make_cache(), make_sampler(0.0), CHUNK)
    mx.eval(token)
    assert len(recorder.seen) == 5
    for limit, live in recorder.seen:
        assert live < limit <= min(before, live + PREFILL_TRANSIENT_BYTES)
    assert mx.get_memory_limit() == before


def test_a_failing_prefill_restores_the_memory_limit(model):
    before = mx.get_memory_limit()
    prompt = mx.random.randint(10, 300, (3 * CHUNK,), key=mx.random.key(2))
    with pytest.raises(RuntimeError, match="chunk failed"):
        prefill(prompt, LimitRecorder(model, fail_at=2), model.make_cache(), make_sampler(0.0), CHUNK)
    assert mx.get_memory_limit() == before


class RecordedEvaluations:
    """mlx.core as memory_bound sees it, recording which arrays pace queues and which it waits for."""

    def __init__(self):
        self.queued, self.waited, self.synchronized = [], [], 0

    def async_eval(self, *arrays):
        self.queued.append(arrays)
        mx.async_eval(*arrays)

    def synchronize(self):
        self.synchronized += 1
        mx.synchronize()

    def eval(self, *arrays):
        self.waited.append(arrays)
        mx.eval(*arrays)

    def __getattr__(self, name):
        return getattr(mx, name)


def test_pace_waits_for_the_piece_queued_before_the_last_one_and_only_in_a_bounded_block(monkeypatch):
    recorded = RecordedEvaluations()
    monkeypatch.setattr(memory_bound, "mx", recorded)
    monkeypatch.setattr(memory_bound, "PACED_AHEAD", 1)
    pieces = [(mx.ones(4) * i,) for i in range(4)]
    memory_bound.pace(*pieces[0])  # outside a bound: nothing queued, nothing waited for
    assert recorded.queued == [] and recorded.waited == []
    with memory_bound.transient_memory_bound(1 << 20):
        for piece in pieces:
            memory_bound.pace(*piece)
    assert [arrays[0] is piece[0] for arrays, piece in zip(recorded.queued, pieces)] == [True] * 4
    assert [arrays[0] is piece[0] for arrays, piece in zip(recorded.waited, pieces[:3])] == [True] * 3
    assert len(recorded.waited) == 3
    memory_bound.pace(*pieces[0])  # the block left: inert again, so a step traced later by mx.compile may call it
    assert len(recorded.queued) == 4


@pytest.mark.parametrize("budget_bytes, synchronizations", [(0, 4), (1 << 40, 0)])
def test_pace_waits_for_the_release_of_what_finished_pieces_held_only_when_over_the_bound(
        monkeypatch, budget_bytes, synchronizations):
    """Over the bound, pace waits for the whole stream (mx.synchronize), which on CUDA also waits for MLX to release
    the finished pieces' inputs; under it, the device keeps its queue."""
    recorded = RecordedEvaluations()
    monkeypatch.setattr(memory_bound, "mx", recorded)
    monkeypatch.setattr(memory_bound, "PACED_AHEAD", 1)
    pieces = [(mx.ones(1 << 16) * i,) for i in range(4)]  # not yet evaluated: each allocates as it is queued
    with memory_bound.transient_memory_bound(budget_bytes) as bound:
        bound()
        for piece in pieces:
            memory_bound.pace(*piece)
    assert recorded.synchronized == synchronizations


def test_a_paced_prefill_computes_what_an_unpaced_one_does(model, monkeypatch):
    """Pacing only changes when pieces are evaluated: the caches and the first token's log-probabilities are the
    same bit for bit (attention in blocks of BLOCK_KEYS keys, each block paced too)."""
    heads = model.config.text_config.num_attention_heads
    monkeypatch.setattr(attention, "SCORES_PER_BLOCK", heads * CHUNK * BLOCK_KEYS)
    results = []
    for ahead in (0, 1):
        monkeypatch.setattr(memory_bound, "PACED_AHEAD", ahead)
        cache = model.make_cache()
        prompt = mx.random.randint(10, 300, (700,), key=mx.random.key(7))
        token, logprobs = prefill(prompt, model, cache, make_sampler(0.0), CHUNK)
        results.append([token, logprobs] + [part for c in cache for part in (c.keys, c.values)])
    assert all(mx.array_equal(a, b) for a, b in zip(*results))


@pytest.fixture(scope="module")
def quantizable_model(tmp_path_factory):
    """Head sizes that 8-bit KV groups of 32 divide."""
    folder = tmp_path_factory.mktemp("prefill_memory_quantizable")
    save_reference_checkpoint(folder, dict(max_position_embeddings=4096, head_dim=32, global_head_dim=64),
                              vision=False, audio=False, seed=3)
    return load(folder)[0]


def live_after_prefill_bytes(model, prompt: mx.array, chunk: int, kv_bits=None) -> int:
    """Memory a prefill leaves live (its caches, the first token and its log-probabilities), with the prompt run in
    chunks of `chunk` tokens."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    cache = model.make_cache()
    quantize_caches(cache, kv_bits, 32, 0)
    token, logprobs = prefill(prompt, model, cache, make_sampler(0.0), chunk)
    mx.eval(token, logprobs)
    gc.collect()
    return mx.get_active_memory() - before


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_what_a_prefill_leaves_live_does_not_depend_on_its_chunk_size(model, quantizable_model, kv_bits):
    """A sliding ring's writes are evaluated with their layer: left queued, each kept its chunk's keys and values
    alive until the next chunk, or after the prefill until the first decoding step (~1 GB on the 12B)."""
    model = model if kv_bits is None else quantizable_model
    prompt = mx.random.randint(10, 300, (2048,), key=mx.random.key(4))
    mx.eval(prompt)
    short, long = (live_after_prefill_bytes(model, prompt, chunk, kv_bits) for chunk in (CHUNK, 4 * CHUNK))
    print(f"live after a prefill, KV {kv_bits or 'unquantized'}: {short / 1e3:.1f} KB in chunks of {CHUNK}, "
          f"{long / 1e3:.1f} KB in chunks of {4 * CHUNK}")
    assert abs(long - short) <= LIVE_DIFFERENCE_BOUND
