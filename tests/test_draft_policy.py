"""The adaptive draft length settles where expected tokens per second are highest, for the machine's measured
round times and the assistant's acceptance by position; a fixed K stays fixed. Rounds are simulated: a seeded
coin decides each draft token, and round times come from a cost curve instead of a clock."""

import random
from collections import Counter

import pytest

from mlx_gemma4.draft_policy import (
    MAX_DRAFT_TOKENS, MAX_PROBE_INTERVAL, PROBE_INTERVAL, TIMED_ROUNDS_NEEDED, DraftPolicy,
)
from mlx_gemma4.errors import Gemma4Error


def expected_tokens(acceptance_by_position, k):
    total, reach = 1.0, 1.0
    for position in range(1, k + 1):
        reach *= acceptance_by_position(position)
        total += reach
    return total


class Machine:
    """Runs rounds for a policy: a seeded coin decides each draft token; a length's first round pays a compile."""

    def __init__(self, seed=0):
        self.generator, self.compiled = random.Random(seed), set()

    def run(self, policy, acceptance_by_position, seconds_of_round, rounds=600):
        """The K of every round."""
        lengths = []
        for _ in range(rounds):
            k = policy.next(remaining=10_000)
            accepted = 0
            while accepted < k and self.generator.random() < acceptance_by_position(accepted + 1):
                accepted += 1
            seconds = seconds_of_round(k) * (1 + 0.05 * self.generator.random())
            policy.record(k, accepted, seconds + (0 if k in self.compiled else 5.0))
            self.compiled.add(k)
            lengths.append(k)
        return lengths


def settled_length(lengths):
    return Counter(lengths[len(lengths) // 2:]).most_common(1)[0][0]


def efficiency(lengths, acceptance_by_position, seconds_of_round):
    """Expected tokens per second over the later half of the rounds, as a fraction of the best fixed length's."""
    late = lengths[len(lengths) // 2:]
    achieved = (sum(expected_tokens(acceptance_by_position, k) for k in late)
                / sum(seconds_of_round(k) for k in late))
    best = max(expected_tokens(acceptance_by_position, k) / seconds_of_round(k) for k in range(MAX_DRAFT_TOKENS + 1))
    return achieved / best


@pytest.mark.parametrize("acceptance, seconds", [
    pytest.param(lambda i: 0.85, lambda k: 1 + 0.08 * k, id="good assistant, near-flat verify cost (GPU-like)"),
    pytest.param(lambda i: 0.6, lambda k: 1 + 0.45 * k, id="fair assistant, linear verify cost (CPU-like)"),
    pytest.param(lambda i: 0.75, lambda k: 1 + 0.2 * k, id="assistant worth a few tokens"),
    pytest.param(lambda i: 0.5 ** i, lambda k: 1 + 0.1 * k, id="each chained guess worse than the last"),
    pytest.param(lambda i: 0.1, lambda k: 1 + 0.3 * k, id="assistant not worth its cost"),
])
def test_adaptive_length_reaches_near_the_best_fixed_lengths_tokens_per_second(acceptance, seconds):
    lengths = Machine().run(DraftPolicy(), acceptance, seconds)
    assert efficiency(lengths, acceptance, seconds) > 0.93


def test_acceptance_is_judged_per_position():
    """A first guess right 90% of the time and chained ones right 5%: one draft token. A single rate over all
    drafted tokens would call this a 50% assistant and draft more."""
    acceptance, seconds = (lambda i: 0.9 if i == 1 else 0.05), (lambda k: 1 + 0.1 * k)
    assert settled_length(Machine().run(DraftPolicy(), acceptance, seconds)) == 1


def test_an_assistant_that_does_not_pay_is_set_aside_and_probed_now_and_then():
    lengths = Machine().run(DraftPolicy(), lambda i: 0.0, lambda k: 1 + 0.3 * k, rounds=20 * PROBE_INTERVAL)
    late = lengths[len(lengths) // 2:]
    assert settled_length(lengths) == 0
    assert 0 < late.count(1) <= (len(late) // PROBE_INTERVAL + 1) * (1 + TIMED_ROUNDS_NEEDED)
    assert max(late) == 1


def test_probes_grow_rare_while_the_choice_holds():
    lengths = Machine().run(DraftPolicy(), lambda i: 0.0, lambda k: 1 + 0.3 * k, rounds=8 * MAX_PROBE_INTERVAL)
    late = lengths[len(lengths) // 2:]
    # A probe is a round to switch plus the rounds it times.
    assert late.count(1) <= (len(late) // MAX_PROBE_INTERVAL + 1) * (1 + TIMED_ROUNDS_NEEDED)


def test_a_set_aside_assistant_comes_back_when_it_starts_to_pay():
    policy, machine, seconds = DraftPolicy(), Machine(), (lambda k: 1 + 0.1 * k)
    assert settled_length(machine.run(policy, lambda i: 0.0, seconds, rounds=200)) == 0
    lengths = machine.run(policy, lambda i: 0.9, seconds, rounds=30 * PROBE_INTERVAL)
    assert efficiency(lengths, lambda i: 0.9, seconds) > 0.9


def test_a_fixed_length_never_changes_and_never_drafts_past_max_tokens():
    policy = DraftPolicy(4)
    assert set(Machine().run(policy, lambda i: 0.0, lambda k: 1.0, rounds=50)) == {4}
    assert policy.next(remaining=3) == 2
    assert DraftPolicy().next(remaining=1) == 0


@pytest.mark.parametrize("k", [0, MAX_DRAFT_TOKENS + 1])
def test_fixed_lengths_out_of_range_are_refused(k):
    with pytest.raises(Gemma4Error, match="num_draft_tokens"):
        DraftPolicy(k)
