"""decode_step's passes of several tokens, as the speculative loop verifies drafts with them, against the uncompiled
forward pass on twin caches: the same logits and hidden states pass after pass, across ring wraps and rollbacks, and
when a pass takes the rollback before it as an array the host has not read yet."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.decode_step import decode_step
from mlx_gemma4.loading import load
from speculative_fixtures import SLIDING_WINDOW, save_small_window_target

PROMPT = list(range(20, 31))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(save_small_window_target(tmp_path_factory.mktemp("target")))[0]


def twin_caches(model) -> tuple:
    """(caches for the forward pass, caches for decode_step, its step on the latter), both after PROMPT."""
    plain_cache, compiled_cache = model.make_cache(), model.make_cache()
    for cache in (plain_cache, compiled_cache):
        mx.eval(model(mx.array(PROMPT)[None], cache=cache))
    return plain_cache, compiled_cache, decode_step(model, compiled_cache, return_hidden=True)


def test_compiled_verify_passes_give_the_forward_passs_logits_across_ring_wraps_and_rollbacks(model):
    """decode_step's passes of several tokens (as the loop verifies drafts) against the uncompiled forward pass on
    twin caches: the same logits and hidden states pass after pass, while the rings wrap many times and rejected
    positions are rolled back."""
    plain_cache, compiled_cache, step = twin_caches(model)
    vocab = model.config.text_config.vocab_size
    rng = np.random.default_rng(3)
    worst = 0.0
    for tokens, rejected in [(3, 1), (1, 0), (4, 3), (2, 0), (7, 2), (5, 5), (1, 0), (6, 1), (9, 4), (3, 0)] * 3:
        ids = mx.array(rng.integers(3, vocab, (1, tokens)), dtype=mx.int32)
        expected = model(ids, cache=plain_cache, return_hidden=True)
        got = step(ids)
        for a, b in zip(got, expected):
            worst = max(worst, mx.abs(a - b).max().item())
        for cache in plain_cache + compiled_cache:
            cache.trim(rejected)
    assert compiled_cache[0].offset == plain_cache[0].offset > len(PROMPT) + 4 * SLIDING_WINDOW
    assert any(key[1] == 9 for key in model.compiled_steps.functions)  # the nine-token pass was compiled
    assert worst < 1e-4


def test_a_pass_queued_before_the_rollback_was_read_gives_the_same_logits(model):
    """The loop queues a round before it has read how many drafts the round before kept: the pass gets that count
    as an array computed on the device, and the caches' offsets count the rejected positions until the loop trims
    them after queueing. Against the forward pass on caches trimmed at once: the same logits, pass after pass."""
    plain_cache, late_cache, step = twin_caches(model)
    vocab = model.config.text_config.vocab_size
    rng = np.random.default_rng(4)
    worst, rollback, unread = 0.0, None, 0
    for tokens, rejected in [(4, 3), (1, 0), (3, 2), (8, 7), (1, 0), (6, 0), (2, 1), (5, 4)] * 3:
        ids = mx.array(rng.integers(3, vocab, (1, tokens)), dtype=mx.int32)
        expected = model(ids, cache=plain_cache, return_hidden=True)
        got = step(ids, rollback)
        for cache in late_cache:
            cache.trim(unread)
        for a, b in zip(got, expected):
            worst = max(worst, mx.abs(a - b).max().item())
        for cache in plain_cache:
            cache.trim(rejected)
        rollback, unread = (mx.array([rejected]) if rejected else None), rejected
    for cache in late_cache:
        cache.trim(unread)
    assert late_cache[0].offset == plain_cache[0].offset > len(PROMPT) + 4 * SLIDING_WINDOW
    assert worst < 1e-4
