"""A conversation on one prompt_cache: however a generation ends (a stop token, max_tokens, or the caller leaving
the loop), with or without the drafter, greedy or sampled, the cache then holds exactly the prompt and every token
handed out, so the next turns see the logits of one full forward pass over the whole conversation."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.decoding import generate_step
from mlx_gemma4.drafter import load_drafter
from mlx_gemma4.generation import stream_generate
from mlx_gemma4.loading import load
from reference_models import save_reference_checkpoint
from speculative_fixtures import ScriptedDrafter, save_reference_assistant

SLIDING_WINDOW = 4
TURNS = [list(range(20, 31)), [40, 41, 42], [50, 51, 52, 53, 54]]
MAX_TOKENS = 9
BREAK_AFTER = 5
STOP_AT = 4
# Cached against one full forward pass in float32: at most 2.4e-6 measured here; bounded at about 10x that.
TOLERANCE = 3e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target_folder = tmp_path_factory.mktemp("target")
    save_reference_checkpoint(target_folder, dict(sliding_window=SLIDING_WINDOW), vision=False, audio=False, seed=7)
    assistant_folder = tmp_path_factory.mktemp("assistant")
    save_reference_assistant(assistant_folder, seed=8, sliding_window=SLIDING_WINDOW)
    model, processor = load(target_folder)
    return model, processor, load_drafter(assistant_folder)


class StopsAtTheNthToken:
    """processor.stop_token_ids for a turn whose n-th token, whichever the sampler and the drafts make it, is a stop
    token (the generation asks once per token handed out)."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def __contains__(self, token) -> bool:
        self.seen += 1
        return self.seen == self.n


def plain_greedy_conversation(model, turns: list, max_tokens: int) -> list:
    """Every token of the conversation (prompts and greedy replies of max_tokens), from plain decoding."""
    cache, sequence = model.make_cache(), []
    for turn in turns:
        sequence += turn
        replies = generate_step(mx.array(turn), model, max_tokens=max_tokens, prompt_cache=cache)
        sequence += [token for token, _ in replies]
    return sequence


def run_turn(model, processor, turn, cache, drafter, stop, sampled):
    """The tokens handed out for `turn` when generation ends by `stop`; the generator is kept alive (not closed)
    when the caller leaves the loop, so nothing can depend on its clean-up."""
    options = dict(max_tokens=MAX_TOKENS, prompt_cache=cache, draft_model=drafter)
    if drafter is not None:
        options["num_draft_tokens"] = 3
    if sampled:
        options.update(temp=1.0, top_p=0.9, seed=len(turn))
    generator = stream_generate(model, processor, turn, **options)
    tokens = []
    for response in generator:
        tokens.append(response.token)
        if stop == "break" and len(tokens) == BREAK_AFTER:
            break
    return tokens, generator


# The always-right double proposes the greedy continuation: it is a drafter for greedy decoding only.
DECODERS = [("plain", False), ("plain", True), ("assistant", False), ("assistant", True), ("always_right", False)]


@pytest.mark.parametrize("stop", ["stop_token", "max_tokens", "break"])
@pytest.mark.parametrize("drafting,sampled", DECODERS, ids=[f"{d}-{'sampled' if s else 'greedy'}" for d, s in DECODERS])
def test_later_turns_see_the_whole_conversation_however_a_turn_ends(pair, drafting, sampled, stop):
    model, processor, assistant = pair
    drafter = {"plain": None, "assistant": assistant}.get(drafting)
    if drafting == "always_right":
        drafter = ScriptedDrafter(assistant, plain_greedy_conversation(model, TURNS[:2], MAX_TOKENS))
    stop_tokens = StopsAtTheNthToken(STOP_AT) if stop == "stop_token" else set()
    processor.stop_token_ids, saved_stops = stop_tokens, processor.stop_token_ids
    try:
        cache = model.make_cache()
        conversation, alive = [], []
        for turn in TURNS[:2]:
            tokens, generator = run_turn(model, processor, turn, cache, drafter, stop, sampled)
            alive.append(generator)
            conversation += turn + tokens
            assert cache[0].offset == len(conversation)
            assert len(tokens) == {"stop_token": STOP_AT, "max_tokens": MAX_TOKENS, "break": BREAK_AFTER}[stop]
            if stop == "stop_token":
                stop_tokens.seen = 0
    finally:
        processor.stop_token_ids = saved_stops
    third = model(mx.array([TURNS[2]]), cache=cache)
    whole = model(mx.array([conversation + TURNS[2]]))[:, -len(TURNS[2]):]
    assert np.abs(np.array(third) - np.array(whole)).max() <= TOLERANCE


def test_greedy_turns_with_the_drafter_equal_plain_greedy_turns(pair):
    model, processor, assistant = pair
    saved_stops, processor.stop_token_ids = processor.stop_token_ids, set()
    try:
        replies = {}
        for drafter in (None, assistant):
            cache = model.make_cache()
            replies[drafter is None] = [run_turn(model, processor, turn, cache, drafter, "max_tokens", False)[0]
                                        for turn in TURNS]
    finally:
        processor.stop_token_ids = saved_stops
    assert replies[True] == replies[False]
