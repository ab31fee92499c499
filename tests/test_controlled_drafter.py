"""The benchmark's controlled-acceptance drafter proposes the target's own greedy tokens at the rate it is given."""

import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from controlled_drafter import ControlledDrafter  # noqa: E402

VOCAB = 50
GREEDY = [7, 11, 13, 17, 19, 23, 29, 31, 37, 41]
PROMPT = 20


class Assistant:
    """Stands in for a Drafter: its compiled step gives the same logits for every token."""

    def compiled_step(self):
        return lambda embedding, state, target_kv, position, masks: (mx.zeros((1, 1, VOCAB)), state)


assistant = Assistant()


def round_of_proposals(drafter, position: int, k: int) -> list:
    step = drafter.compiled_step()
    state, at = mx.zeros((1, 1, 4)), mx.array([position])  # one position array for the round's steps
    tokens = []
    for _ in range(k):
        logits, state = step(None, state, {}, at, {})
        tokens.append(mx.argmax(logits[0, -1]).item())
    return tokens


def test_full_acceptance_proposes_the_greedy_continuation_of_each_round():
    drafter = ControlledDrafter(assistant, GREEDY, PROMPT, 1.0, VOCAB)
    # After the prompt's first generated token (index 0) the cache holds PROMPT positions: drafts are 1, 2, 3.
    assert round_of_proposals(drafter, PROMPT, 3) == GREEDY[1:4]
    # Two tokens later, the next round drafts from index 3 on.
    assert round_of_proposals(drafter, PROMPT + 2, 2) == GREEDY[3:5]


def test_zero_acceptance_never_proposes_the_greedy_token():
    drafter = ControlledDrafter(assistant, GREEDY, PROMPT, 0.0, VOCAB)
    proposals = [round_of_proposals(drafter, PROMPT + i, 1)[0] for i in range(len(GREEDY) - 1)]
    assert all(token != GREEDY[i + 1] for i, token in enumerate(proposals))


def test_half_acceptance_proposes_the_greedy_token_about_half_the_time():
    drafter = ControlledDrafter(assistant, GREEDY * 40, PROMPT, 0.5, VOCAB, seed=3)
    hits = sum(round_of_proposals(drafter, PROMPT + i, 1)[0] == (GREEDY * 40)[i + 1] for i in range(399))
    assert 150 < hits < 250
