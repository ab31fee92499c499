"""A drafter for the benchmark only, whose acceptance rate is set rather than learned: the speculative loop's
end-to-end speed at a given acceptance, at the 12B shape, without trained weights.

It runs the real (here random) assistant at every step, so that each draft costs what a draft costs, then proposes
the target's own next greedy token (read from a plain greedy run of the same prompt) with probability `acceptance`
and some other token otherwise. The draft loop calls the drafter k times per round with the round's starting
position (one array for the round), which is how a step's place in its round is told.
"""

import random

import mlx.core as mx

from mlx_gemma4.draft_policy import DraftPolicy

# Logit of the proposed token; every other token gets its negative. Far beyond any real logit after softcapping.
CHOSEN_LOGIT = 1e4


class ControlledDrafter:
    def __init__(self, drafter, greedy_tokens: list, prompt_length: int, acceptance: float, vocab_size: int,
                 seed: int = 0):
        self.drafter, self.prompt_length = drafter, prompt_length
        self.greedy_tokens = mx.array(list(greedy_tokens) + [0])  # 0 past the plain run's end
        self.acceptance, self.vocab_size = acceptance, vocab_size
        self.random = random.Random(seed)
        self.round_position, self.step = None, 0
        # Its own adaptive policy (speculative.py reads a drafter's): what it learns is this acceptance rate's.
        self.draft_policy = DraftPolicy()

    def proposal(self, position: mx.array) -> mx.array:
        """The token to propose, computed on the device: the round's position may not be known on the host yet
        (the loop queues a round before it has read the one before), but all of a round's steps get the same
        position array."""
        self.step = self.step + 1 if position is self.round_position else 0
        self.round_position = position
        # The round starts after the token at `position`, the (position - prompt_length)-th generated one.
        index = mx.clip(position - self.prompt_length + 1 + self.step, 0, self.greedy_tokens.size - 1)
        right = mx.take(self.greedy_tokens, index)
        if self.random.random() < self.acceptance:
            return right
        return (right + 1 + self.random.randrange(self.vocab_size - 1)) % self.vocab_size

    def compiled_step(self):
        """The wrapped drafter's compiled step (what the speculative loop runs), each draft's logits replaced by
        ones that pick this drafter's proposal."""
        inner = self.drafter.compiled_step()
        return lambda embedding, state, target_kv, position, masks: self.controlled(
            *inner(embedding, state, target_kv, position, masks), position)

    def controlled(self, logits, state, position: mx.array):
        token = self.proposal(position)
        chosen = mx.where(mx.arange(self.vocab_size) == token, CHOSEN_LOGIT, -CHOSEN_LOGIT)
        # `logits * 0` keeps the assistant's own work in the graph, so the draft is computed (and paid for).
        return logits.astype(mx.float32) * 0 + chosen, state
