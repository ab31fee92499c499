"""Speculative sampling draws from exactly the distribution plain sampling draws from: make_filter gives the
log-probabilities mlx-lm's make_sampler samples (top-p, min-p, top-k, their combinations, the temperature), and the
rejection rule turns drafts from another distribution into draws from that one."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import sample_utils

from mlx_gemma4.speculative import make_filter, make_rejection_rule

VOCAB = 12
# (temp, top_p, top_k, min_p): each filter alone, and together, on distributions where each one cuts tokens.
SETTINGS = [
    (1.0, 0.8, 0, 0.0),
    (0.7, 0.0, 0, 0.1),
    (1.0, 0.0, 4, 0.0),
    (0.7, 0.9, 0, 0.05),
    (1.3, 0.85, 5, 0.0),
    (0.5, 0.0, 6, 0.2),
    (1.0, 0.9, 5, 0.03),
]
SETTING_IDS = [f"temp={t},top_p={p},top_k={k},min_p={m}" for t, p, k, m in SETTINGS]
# Float32 rounding between `x / temp` and mlx-lm's `x * (1 / temp)`, and of the two normalizations: ~1e-7 measured.
PROBABILITY_TOLERANCE = 1e-5
TRIALS = 20_000
# Total variation between TRIALS rejection-rule draws and the exact filtered distribution over VOCAB outcomes:
# about 0.01 expected; 0.03 is past 5 standard deviations. Taking the drafts as they come is far beyond it.
TV_BOUND = 0.03


def logits_rows(seed: int, rows: int = 1) -> mx.array:
    """Spread-out logits, so that every filter in SETTINGS removes some tokens and keeps several."""
    return mx.array(np.random.default_rng(seed).normal(scale=2.0, size=(rows, VOCAB)).astype(np.float32))


def sampler_logits(monkeypatch, logits: mx.array, temp, top_p, top_k, min_p) -> mx.array:
    """The logits mlx-lm's make_sampler hands to mx.random.categorical for these log-probabilities."""
    seen = []

    def record(logits, temp):
        seen.append(logits * (1.0 / temp))
        return mx.argmax(seen[-1], axis=-1)

    monkeypatch.setattr(sample_utils, "categorical_sampling", record)
    sampler = sample_utils.make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
    sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    (drawn_from,) = seen
    return drawn_from


@pytest.mark.parametrize("temp, top_p, top_k, min_p", SETTINGS, ids=SETTING_IDS)
def test_make_filter_gives_the_distribution_mlx_lms_sampler_draws_from(monkeypatch, temp, top_p, top_k, min_p):
    logits = logits_rows(seed=0, rows=4)
    ours = np.array(mx.exp(make_filter(temp, top_p, top_k, min_p)(logits)))
    theirs = np.array(mx.softmax(sampler_logits(monkeypatch, logits, temp, top_p, top_k, min_p), axis=-1))
    np.testing.assert_array_equal(ours > 0, theirs > 0)
    assert ((ours > 0).sum(-1) < VOCAB).all() and ((ours > 0).sum(-1) > 1).all()  # the filters did cut, not all
    np.testing.assert_allclose(ours, theirs, atol=PROBABILITY_TOLERANCE, rtol=0)


def rule_outcomes(temp, top_p, top_k, min_p, target_logits: mx.array, draft_logits: mx.array) -> tuple:
    """TRIALS independent one-draft rounds, as rows of one call: each row's draft is drawn from the drafter's
    filtered distribution, and the rule keeps it or replaces it. Returns (tokens emitted, drafts proposed)."""
    sampling_logprobs = make_filter(temp, top_p, top_k, min_p)
    draft_logprobs = mx.repeat(sampling_logprobs(draft_logits), TRIALS, axis=0)
    drafts = mx.random.categorical(draft_logprobs)
    accept = make_rejection_rule(sampling_logprobs)
    accepted, fallback = accept(mx.repeat(target_logits, TRIALS + 1, axis=0), drafts, draft_logprobs)
    emitted = mx.where(accepted, drafts, fallback[:TRIALS])
    return np.array(emitted), np.array(drafts)


def total_variation(tokens: np.ndarray, exact: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.bincount(tokens, minlength=VOCAB) / len(tokens) - exact).sum())


@pytest.mark.parametrize("temp, top_p, top_k, min_p", SETTINGS, ids=SETTING_IDS)
def test_the_rejection_rule_emits_the_targets_filtered_distribution(temp, top_p, top_k, min_p):
    target_logits, draft_logits = logits_rows(seed=1), logits_rows(seed=2)
    exact = np.array(mx.exp(make_filter(temp, top_p, top_k, min_p)(target_logits)))[0]
    mx.random.seed(3)
    emitted, drafts = rule_outcomes(temp, top_p, top_k, min_p, target_logits, draft_logits)
    assert total_variation(emitted, exact) < TV_BOUND
    assert set(emitted.tolist()) <= set(np.nonzero(exact)[0].tolist())
    # The test has teeth: the drafter's own proposals are far from the target's distribution.
    assert total_variation(drafts, exact) > 3 * TV_BOUND
