"""A compiled step's in-place cache writes (cache_writes.py): the rule, the wiring and the ownership of the buffers
(CPU tests, the kernel stood in for), and what the kernel writes (tests marked `gpu`, skipped where CUDA is absent)."""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import cache_writes, decode_step, decoder, kv_cache
from mlx_gemma4.kv_cache import FullCache, WindowCache, is_quantized
from mlx_gemma4.prompt_cache_file import load_prompt_cache, save_prompt_cache
from mlx_gemma4.server.prompt_cache_store import snapshot
from gpu_fixtures import gpu_test_model

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny():
    from random_model import build_random_model

    return build_random_model("tiny", 16, seed=3)[0]


def address(array: mx.array) -> int:
    """Where the array's data lies (CPU): equal for arrays over one buffer (bfloat16 through a view as uint16,
    which numpy can take)."""
    array = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
    mx.eval(array)
    return np.asarray(memoryview(array)).__array_interface__["data"][0]


def values_of(array: mx.array) -> np.ndarray:
    return np.array(array.astype(mx.float32) if array.dtype == mx.bfloat16 else array)


def buffers_of(cache: list) -> list:
    return [part for layer in cache for part in layer.arrays()]


def test_the_rule_takes_rows_of_their_buffers_form_on_cuda_only(monkeypatch):
    buffer, rows = mx.zeros((1, 2, 64, 256), mx.bfloat16), mx.zeros((1, 2, 3, 256), mx.bfloat16)
    assert not cache_writes.uses_in_place([buffer], [rows])  # this CPU
    monkeypatch.setattr(cache_writes, "cuda_backend", lambda: True)
    assert cache_writes.uses_in_place([buffer], [rows])
    packed = tuple(mx.quantize(mx.zeros((1, 2, 64, 256)), group_size=64, bits=8))
    assert cache_writes.uses_in_place(list(packed), list(mx.quantize(mx.zeros((1, 2, 1, 256)), bits=8)))
    assert not cache_writes.uses_in_place([buffer], [rows.astype(mx.float16)])
    assert not cache_writes.uses_in_place([buffer], [mx.zeros((1, 1, 3, 256), mx.bfloat16)])
    assert not cache_writes.uses_in_place([mx.zeros((1, 2, 64, 1), mx.bfloat16)], [mx.zeros((1, 2, 1, 1), mx.bfloat16)])
    monkeypatch.setenv(cache_writes.SWITCH, "0")
    assert not cache_writes.uses_in_place([buffer], [rows])


class StoodIn:
    """cache_writes as the compiled step sees it on CUDA, its launch recorded: the queries come back as they went in
    (nothing is written: the stand-in checks the wiring, not the numbers)."""

    def __init__(self):
        self.launches, self.returned = [], []

    def uses_in_place(self, buffers, rows):
        return True

    def written_then(self, buffers, rows, positions, then, after):
        self.launches.append(([b.shape for b in buffers], [r.shape for r in rows], positions.shape, after.shape))
        self.returned.append(mx.array(then))
        return self.returned[-1]


def test_a_compiled_step_writes_each_cached_layer_once_and_attends_with_the_queries_the_write_returns(tiny,
                                                                                                     monkeypatch):
    stood_in, attended = StoodIn(), []
    monkeypatch.setattr(decode_step, "cache_writes", stood_in)
    original = decoder.scaled_dot_product_attention

    def recorded(queries, keys, values, mask):
        attended.append(queries)
        return original(queries, keys, values, mask)

    monkeypatch.setattr(decoder, "scaled_dot_product_attention", recorded)
    tiny.compiled_steps.forget()
    cache = tiny.make_cache()
    mx.eval(tiny(mx.arange(40)[None] + 5, cache=cache))
    before = [address(part) for part in buffers_of(cache)]
    attended.clear()
    mx.eval(decode_step.decode_step(tiny, cache)(mx.array([[7]])))
    layers = len(tiny.language_model.model.cached_layers)
    traces = len(tiny.compiled_steps.functions)
    assert len(stood_in.launches) == layers * traces
    for buffers, rows, positions, after in stood_in.launches:
        assert positions == (1,) and len(buffers) == len(rows) == 2 and after == (1, 1, 1)
        assert all(b[:2] == r[:2] and b[3] == r[3] and r[2] == 1 for b, r in zip(buffers, rows))
    assert len(attended) == len(stood_in.launches)  # every layer of this model keeps a cache
    assert all(any(q is r for r in stood_in.returned) for q in attended)
    # The buffers are the same ones: nothing was copied, nothing replaced.
    assert [address(part) for part in buffers_of(cache)] == before
    tiny.compiled_steps.forget()


def test_each_pass_leaves_a_fence_of_its_output_which_a_later_eager_pass_waits_for(tiny, monkeypatch):
    monkeypatch.setattr(decode_step, "cache_writes", StoodIn())
    tiny.compiled_steps.forget()
    cache = tiny.make_cache()
    _, hidden = tiny(mx.arange(40)[None] + 5, cache=cache, return_hidden=True)
    assert all(layer.read_fence.shape == (1, 1, 1) for layer in cache)
    assert all(layer.read_fence.item() == hidden[0, -1, 0].item() for layer in cache)
    _, hidden = decode_step.decode_step(tiny, cache, return_hidden=True)(mx.array([[7]]))
    assert all(layer.read_fence.item() == hidden[0, -1, 0].item() for layer in cache)
    # An eager pass after a step that may have written in place: its writes depend on the step's fence.
    monkeypatch.setattr(kv_cache.cache_writes, "in_place_possible", lambda: True)
    fences, waited_for = [layer.read_fence for layer in cache], []
    original = mx.depends

    def recorded(inputs, dependencies):
        waited_for.append(dependencies)
        return original(inputs, dependencies)

    monkeypatch.setattr(kv_cache.mx, "depends", recorded)
    mx.eval(tiny(mx.array([[8, 9, 10]]), cache=cache))
    assert len(waited_for) == len(cache)
    assert all(dependencies[0] is fence for dependencies, fence in zip(waited_for, fences))
    tiny.compiled_steps.forget()


def test_a_step_first_copies_buffers_that_a_state_handed_out(tiny, monkeypatch):
    monkeypatch.setattr(decode_step, "cache_writes", StoodIn())
    tiny.compiled_steps.forget()
    cache = tiny.make_cache()
    mx.eval(tiny(mx.arange(40)[None] + 5, cache=cache))
    step = decode_step.decode_step(tiny, cache)
    assert not any(layer.buffers_shared for layer in cache)
    before = [address(layer.keys) for layer in cache]
    handed_out = [layer.state[0] for layer in cache]
    assert all(layer.buffers_shared for layer in cache)
    kept = [values_of(keys) for keys in handed_out]
    mx.eval(step(mx.array([[7]])))
    assert not any(layer.buffers_shared for layer in cache)
    for layer, buffer, keys, values in zip(cache, before, handed_out, kept):
        assert address(layer.keys) != buffer  # written in place from now on: its own copy
        assert np.array_equal(values_of(keys), values)
    owned = [address(part) for part in buffers_of(cache)]
    mx.eval(step(mx.array([[8]])))
    assert [address(part) for part in buffers_of(cache)] == owned  # copied once, not at every step
    tiny.compiled_steps.forget()


def test_who_holds_the_buffers_alone(tiny, tmp_path):
    cache = tiny.make_cache()
    mx.eval(tiny(mx.arange(40)[None] + 5, cache=cache))
    kept = snapshot(cache)
    assert all(layer.buffers_shared for layer in cache + kept)
    for layer in cache:
        layer.hold_buffers_alone()
    assert not any(layer.buffers_shared for layer in cache)
    save_prompt_cache(tmp_path / "cache.safetensors", cache, tiny)
    loaded = load_prompt_cache(tmp_path / "cache.safetensors", tiny)
    assert not any(layer.buffers_shared for layer in loaded)  # the file's arrays, held by nothing else
    restored = [type(layer).from_state(layer.state) for layer in cache]
    assert all(layer.buffers_shared for layer in restored)
    full = next(layer for layer in restored if isinstance(layer, FullCache))
    full.reserve(full.capacity() + 256)
    assert not full.buffers_shared  # new arrays


@gpu
def test_the_kernel_writes_each_part_at_its_positions_and_hands_back_the_queries():
    mx.random.seed(0)
    plain = mx.random.normal((1, 2, 64, 256)).astype(mx.bfloat16)
    triple = tuple(mx.quantize(mx.random.normal((1, 2, 96, 256)), group_size=64, bits=8))
    window = mx.random.normal((1, 2, 80, 512)).astype(mx.bfloat16)[:, :, 8:72]  # a view: rows 8-71 of a buffer
    mx.eval(plain, triple, window)
    positions = mx.array([5, 9, 63], mx.int32)
    new_plain = mx.random.normal((1, 2, 3, 256)).astype(mx.bfloat16)
    new_triple = tuple(mx.quantize(mx.random.normal((1, 2, 3, 256)), group_size=64, bits=8))
    new_window = mx.random.normal((1, 3, 2, 512)).astype(mx.bfloat16).transpose(0, 2, 1, 3)  # strided rows
    queries = mx.random.normal((1, 4, 8, 256)).astype(mx.bfloat16).transpose(0, 2, 1, 3)  # strided queries
    buffers, rows = [plain, *triple, window], [new_plain, *new_triple, new_window]
    expected = []
    for buffer, new in zip(buffers, rows):
        values = values_of(buffer)
        values[:, :, np.array(positions)] = values_of(new)
        expected.append(values)
    assert cache_writes.uses_in_place(buffers, rows)
    returned = cache_writes.written_then(buffers, rows, positions, queries, after=mx.zeros((1, 1, 1), mx.bfloat16))
    mx.eval(returned)
    assert np.array_equal(values_of(returned), values_of(queries))
    for buffer, values in zip(buffers, expected):
        assert np.array_equal(values_of(buffer), values)


def greedy_logits(model, cache: list, steps: int) -> list:
    step = decode_step.decode_step(model, cache)
    token, logits = mx.array([[11]]), []
    for _ in range(steps):
        logits.append(step(token))
        token = mx.argmax(logits[-1][:, -1:], axis=-1)
    mx.eval(logits)
    return logits


def decoded_both_ways(monkeypatch, decode, kv_bits=None) -> dict:
    """{switch: decode(model, cache)} with the writes in place ("1") and through put_along_axis ("0"), each after the
    same 100-token prompt into a fresh cache (quantized at kv_bits)."""
    from mlx_gemma4.decoding import quantize_caches

    model = gpu_test_model()[0]
    runs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(cache_writes.SWITCH, switch)
        model.compiled_steps.forget()
        cache = model.make_cache()
        quantize_caches(cache, kv_bits, 64, 0)
        mx.eval(model(mx.arange(100)[None] % 4000 + 10, cache=cache))
        runs[switch] = decode(model, cache)
    return runs


@gpu
@pytest.mark.parametrize("kv_bits", [None, 8])
def test_a_model_decodes_bit_for_bit_alike_with_the_writes_in_place_or_not(monkeypatch, kv_bits):
    # 80 steps: the 64-key window wraps.
    runs = decoded_both_ways(monkeypatch, lambda model, cache: (greedy_logits(model, cache, 80), buffers_of(cache)),
                             kv_bits)
    for ours, theirs in zip(runs["1"][0], runs["0"][0]):
        assert mx.array_equal(ours, theirs)
    for ours, theirs in zip(runs["1"][1], runs["0"][1]):
        assert mx.array_equal(ours, theirs)


@gpu
def test_steps_queued_together_with_their_tokens_known_ahead_read_each_others_rows(monkeypatch):
    """No step's input is made from the step before, so only the writes' read fences order the steps within the
    one graph they are evaluated in (cache_writes.py)."""

    def queued_together(model, cache):
        step = decode_step.decode_step(model, cache)
        logits = [step(mx.array([[token]])) for token in range(20, 100)]  # the 64-key window wraps
        mx.eval(logits)
        return logits

    runs = decoded_both_ways(monkeypatch, queued_together)
    for ours, theirs in zip(runs["1"], runs["0"]):
        assert mx.array_equal(ours, theirs)


@gpu
def test_a_snapshot_keeps_its_contents_while_the_cache_decodes_in_place(monkeypatch):
    monkeypatch.setenv(cache_writes.SWITCH, "1")
    model = gpu_test_model()[0]
    model.compiled_steps.forget()
    cache = model.make_cache()
    mx.eval(model(mx.arange(100)[None] % 4000 + 10, cache=cache))
    kept = snapshot(cache)
    contents = [values_of(part) for part in buffers_of(kept)]
    greedy_logits(model, cache, 8)
    for part, values in zip(buffers_of(kept), contents):
        assert np.array_equal(values_of(part), values)
    assert any(isinstance(layer, WindowCache) and not is_quantized(layer.keys) for layer in kept)
