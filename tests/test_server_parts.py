"""The server's parts without HTTP: the reply parser, the stop-string filter, the prompt-cache store and the engine
that serves from it, the forced tool-call grammar. The engine runs in this thread, where the package made its
streams."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.drafter import load_drafter
from mlx_gemma4.loading import load
from mlx_gemma4.server.chat_format import (ReplyParser, forced_tool_grammar, gemma_arguments_to_json,
                                           parse_tool_call)
from mlx_gemma4.server.engine import Engine, Finished, Job, Piece, Prompt, QueueFull, Settings, StopStringFilter, media_keys
from mlx_gemma4.server.prompt_cache_store import PromptCacheStore, can_rewind, rewind, snapshot
from server_fixtures import WEATHER_TOOL, save_server_checkpoint
from speculative_fixtures import save_reference_assistant, window_sized_rings

REPLY = ('<|channel>thought\nPlan: ask.<channel|>Sure, <|tool_call>call:get_weather{city:<|"|>Paris, {FR}<|"|>,'
         "days:3,hourly:true}<tool_call|><|tool_response>anything after")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parts")
    save_server_checkpoint(folder)
    return load(folder)


@pytest.fixture(scope="module")
def drafter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("assistant")
    save_reference_assistant(folder)
    return load_drafter(folder)


def parse_in_pieces(text: str, size: int):
    parser, pieces = ReplyParser(), []
    for start in range(0, len(text), size):
        pieces.append(parser.feed(text[start : start + size]))
    pieces.append(parser.feed("", final=True))
    return ("".join(p.content for p in pieces), "".join(p.reasoning for p in pieces),
            [call["function"] for p in pieces for call in p.tool_calls])


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(REPLY)])
def test_reply_parser_gives_the_same_pieces_however_the_text_is_split(size):
    content, reasoning, calls = parse_in_pieces(REPLY, size)
    assert (content, reasoning) == ("Sure, ", "Plan: ask.")
    assert calls == [{"name": "get_weather",
                      "arguments": json.dumps({"city": "Paris, {FR}", "days": 3, "hourly": True})}]


def test_a_call_that_does_not_parse_stays_content():
    broken = "<|tool_call>call:f{a:oops<tool_call|>"
    assert parse_in_pieces(broken, 1) == (broken, "", [])


def test_a_call_cut_before_its_end_stays_content():
    assert parse_in_pieces("Hi <|tool_call>call:f{a:1", 4) == ("Hi <|tool_call>call:f{a:1", "", [])


def test_gemma_arguments_nest_and_keep_their_strings_whole():
    text = '{loc:{city:<|"|>Paris<|"|>,zip:75000},days:[1,2],note:<|"|>a:b,c{d}<|"|>,ok:false}'
    assert gemma_arguments_to_json(text) == {"loc": {"city": "Paris", "zip": 75000}, "days": [1, 2],
                                             "note": "a:b,c{d}", "ok": False}
    assert parse_tool_call("call:f{}")["function"]["arguments"] == "{}"


def test_stop_string_is_cut_even_across_pieces():
    stops = StopStringFilter(["STOP"])
    results = [stops.feed(text, False) for text in ("Hel", "lo ST", "OP more")]
    assert "".join(text for text, _ in results) == "Hello " and [stopped for _, stopped in results] == [
        False, False, True]


def test_text_held_back_for_a_stop_string_comes_out_at_the_end():
    stops = StopStringFilter(["STOP"])
    assert stops.feed("abc ST", False)[0] + stops.feed("", True)[0] == "abc ST"


def test_forced_tool_grammar_lets_only_a_parseable_call_through(library):
    from mlx_lm.sample_utils import make_sampler

    from mlx_gemma4.server.constrained import ConstrainedSampler, GrammarTokenizer

    _, processor = library
    vocab = processor.tokenizer.get_vocab()
    grammar = forced_tool_grammar([WEATHER_TOOL], "required", vocab.get)
    sampler = ConstrainedSampler(GrammarTokenizer(processor, vocab["<turn|>"]), grammar, make_sampler(0.0))
    rng, tokens = np.random.default_rng(0), []
    while not sampler.matcher.is_stopped() and len(tokens) < 200:
        tokens.append(sampler(mx.array(rng.normal(size=(1, 389)).astype(np.float32))).item())
    text = processor.tokenizer.decode(tokens)
    assert text.startswith("<|tool_call>") and "<tool_call|><|tool_response>" in text
    call = parse_tool_call(text.removeprefix("<|tool_call>").split("<tool_call|>")[0])
    assert call["function"]["name"] == "get_weather" and len(json.loads(call["function"]["arguments"])["city"]) <= 12


def collect(engine: Engine, ids: list, max_tokens: int = 12) -> tuple:
    """(every token generated, the last event). With logprobs asked for, a token whose text is still pending
    (part of a UTF-8 character) is handed out too."""
    events = []
    settings = Settings(max_tokens=max_tokens, top_logprobs=0)
    engine.serve_one(Job(lambda: Prompt(ids, list(ids)), settings, events.append))
    return [e.token for e in events if isinstance(e, Piece)], events[-1]


def conversation(processor, engine: Engine) -> tuple:
    """Three turns; each reply goes back as text, so its tokens are re-encoded as the next prompt's. Returns the
    prompts and the replies' tokens."""
    messages, prompts, replies = [], [], []
    for question in ("Hello fox", "And the lazy dog?", "Numbers: 1 2 3"):
        messages.append({"role": "user", "content": question})
        ids = processor.encode(processor.apply_chat_template(messages))
        tokens, _ = collect(engine, ids)
        prompts.append(ids)
        replies.append(tokens)
        messages.append({"role": "assistant", "content": processor.tokenizer.decode(tokens)})
    return prompts, replies


@pytest.mark.parametrize("with_drafter", [False, True], ids=["plain", "drafter"])
def test_cached_turns_give_the_cold_turns_greedy_tokens(library, drafter, with_drafter):
    model, processor = library
    cached = Engine(model, processor, PromptCacheStore(model.make_cache), drafter if with_drafter else None)
    prompts, _ = conversation(processor, cached)
    for ids in prompts:
        cold = Engine(model, processor, PromptCacheStore(model.make_cache))
        warm_tokens, warm_end = collect(cached, ids)
        cold_tokens, cold_end = collect(cold, ids)
        assert warm_tokens == cold_tokens
        assert warm_end.cached_tokens > 0 and cold_end.cached_tokens == 0


def test_a_later_turn_prefills_only_what_it_adds(library):
    model, processor = library
    engine = Engine(model, processor, PromptCacheStore(model.make_cache))
    prompts, replies = conversation(processor, engine)
    fed = prompts[-1] + replies[-1]
    added = processor.tokenizer.encode("\n<|turn>user\nMore<turn|>\n<|turn>model\n", add_special_tokens=False)
    _, end = collect(engine, fed + added)
    assert end.cached_tokens == len(fed)  # the whole last turn: its prompt and its reply as fed


def test_a_wrapped_window_ring_cannot_go_back_but_a_longer_ring_can(library):
    model, _ = library
    for cache, expected in ((window_sized_rings(model), False), (model.make_cache(), True)):
        model(mx.arange(20, 40)[None], cache=cache)
        assert can_rewind(cache, 19) is expected and can_rewind(cache, 20)


def test_a_ring_moved_back_after_it_wrapped_cannot_go_back_past_what_it_overwrote(library):
    """Its offset, moved back to within the ring, no longer says that positions 0..4 were overwritten by the last
    five: a request sharing only a short prefix must not take it (it did, and read those slots as its first
    positions' keys)."""
    model, _ = library
    cache = model.make_cache()
    slots = cache[0].slots
    model(mx.arange(20, 25 + slots)[None], cache=cache)  # the ring wraps by five positions
    assert can_rewind(cache, slots - 1)  # the window before it is still held
    rewind(cache, slots - 1)
    assert cache[0].offset < slots
    assert not can_rewind(cache, 3) and can_rewind(cache, slots - 2)


def test_a_snapshot_is_unchanged_by_later_writes(library):
    model, _ = library
    cache = model.make_cache()
    model(mx.arange(20, 30)[None], cache=cache)
    copy = snapshot(cache)
    before = [np.array(layer.keys) for layer in copy]
    model(mx.arange(40, 45)[None], cache=cache)
    assert all(np.array_equal(np.array(layer.keys), old) for layer, old in zip(copy, before))
    assert copy[0].offset == 10 and cache[0].offset == 15


def test_the_store_hands_out_the_longest_prefix_and_forgets_the_oldest(library):
    model, _ = library
    store = PromptCacheStore(model.make_cache, max_entries=2)
    for keys in ([1, 2, 3], [1, 2, 3, 4, 5], [7, 8]):
        cache = model.make_cache()
        model(mx.array(keys)[None], cache=cache)
        store.put(keys, cache)
    assert [entry.keys for entry in store.entries.values()] == [[1, 2, 3, 4, 5], [7, 8]]  # the oldest went first
    cache, reused = store.take([1, 2, 3, 4, 5, 6])
    assert reused == 5 and cache[0].offset == 5
    cache, reused = store.take([1, 2, 3, 9])  # the same entry again, moved back: its ring has not wrapped
    assert reused == 3 and cache[0].offset == 3


def test_the_same_tokens_over_other_media_have_other_keys(library):
    model, processor = library
    config = model.config
    ids = [5, config.image_token_id, config.image_token_id, 6, config.audio_token_id, 7]
    first = media_keys(ids, config, {"images": [b"cat"], "audio": [b"purr"]})
    assert first == media_keys(ids, config, {"images": [b"cat"], "audio": [b"purr"]})
    assert first[:1] == media_keys(ids, config, {"images": [b"dog"], "audio": [b"purr"]})[:1]
    assert first[1] != media_keys(ids, config, {"images": [b"dog"], "audio": [b"purr"]})[1]


def test_a_full_queue_refuses_at_once(library):
    model, processor = library
    engine = Engine(model, processor, PromptCacheStore(model.make_cache), max_queued=1)
    job = Job(lambda: Prompt([1, 2], [1, 2]), Settings(max_tokens=1), lambda event: None)
    engine.submit(job)
    with pytest.raises(QueueFull):
        engine.submit(job)


def test_a_job_whose_client_left_while_waiting_is_dropped(library):
    model, processor = library
    engine = Engine(model, processor, PromptCacheStore(model.make_cache))
    events = []
    job = Job(lambda: Prompt([1, 2], [1, 2]), Settings(max_tokens=3), events.append)
    job.cancelled.set()
    engine.serve_one(job)
    assert events == []


def test_a_failing_job_reports_and_the_next_one_runs(library):
    model, processor = library
    engine = Engine(model, processor, PromptCacheStore(model.make_cache))
    events = []

    def broken():
        raise ValueError("boom")

    engine.serve_one(Job(broken, Settings(max_tokens=3), events.append))
    assert events[0].user_error is False and "ValueError" in events[0].message
    assert isinstance(collect(engine, [2, 30, 31])[1], Finished)


@pytest.mark.parametrize("flags, fragment", [
    (["--model", "/nonexistent"], "model not found"),
    (["--model", "x", "--num-draft-tokens", "3"], "needs --draft-model"),
    (["--model", "x", "--chat-template-args", "{oops"], "not valid JSON"),
])
def test_the_server_refuses_bad_flags_in_one_line(flags, fragment):
    process = subprocess.run([sys.executable, "-m", "mlx_gemma4.server", *flags], capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == 1 and process.stderr.count("\n") == 1 and fragment in process.stderr
