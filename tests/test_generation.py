"""Generation: greedy output equals transformers' greedy generate; sampling, stopping and streaming behave."""

import mlx.core as mx
import pytest
import torch

from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.decoding import generate_step, prefill_chunks
from mlx_gemma4.generation import generate, stream_generate, stream_responses
from mlx_gemma4.loading import load
from reference_models import save_reference_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generation")
    reference = save_reference_checkpoint(folder, dict(sliding_window=4, max_position_embeddings=96), seed=5)
    model, processor = load(folder)
    return folder, reference, model, processor


def reference_greedy(reference, ids, max_new_tokens, stop_ids=None):
    output = reference.generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
        pad_token_id=0,
    )
    return output[0, len(ids):].tolist()


def test_greedy_tokens_equal_transformers_greedy_generate_past_the_window(checkpoint):
    _, reference, model, processor = checkpoint
    ids = processor.encode(processor.chat_prompt("The quick brown fox"))
    expected = reference_greedy(reference, ids, 24)
    got = [r.token for r in stream_generate(model, processor, ids, max_tokens=24, prefill_step_size=5)]
    # Our stream stops at a stop token; transformers was told of none, so compare the common prefix.
    assert got == expected[: len(got)]
    assert len(got) == 24 or got[-1] in processor.stop_token_ids


def test_generation_stops_at_the_end_of_turn_token(checkpoint):
    _, _, model, processor = checkpoint
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<turn|>")
    responses = list(stream_generate(model, processor, [2, 40], max_tokens=10, sampler=lambda lp: mx.array([end_of_turn])))
    assert [r.finish_reason for r in responses] == ["stop"]
    assert responses[0].text == ""


def test_generation_stops_at_max_tokens(checkpoint):
    _, _, model, processor = checkpoint
    responses = list(stream_generate(model, processor, [2, 40], max_tokens=7, sampler=lambda lp: mx.array([300])))
    assert len(responses) == 7 and responses[-1].finish_reason == "length"
    assert all(r.finish_reason is None for r in responses[:-1])


def test_a_reply_cut_short_by_the_context_finishes_on_length(checkpoint):
    _, _, model, processor = checkpoint
    prompt = [2, 40, 41]
    responses = list(stream_generate(model, processor, prompt, max_tokens=200, sampler=lambda lp: mx.array([300])))
    assert len(responses) == model.config.text_config.max_position_embeddings - len(prompt)
    assert responses[-1].finish_reason == "length"


def test_a_later_generation_replays_the_first_ones_compiled_steps(checkpoint):
    _, _, model, processor = checkpoint
    prompt = [2, 40, 41, 42, 43]
    first = generate(model, processor, prompt, max_tokens=12)
    compiled = model.compiled_steps
    functions, traced = dict(compiled.functions), set(compiled.traced)
    assert functions and traced
    assert generate(model, processor, prompt, max_tokens=12) == first
    assert compiled.functions == functions and compiled.traced == traced


def test_same_seed_gives_the_same_sample(checkpoint):
    _, _, model, processor = checkpoint
    first = generate(model, processor, [2, 40, 41], max_tokens=12, temp=1.0, seed=11)
    second = generate(model, processor, [2, 40, 41], max_tokens=12, temp=1.0, seed=11)
    assert first == second


def test_top_k_of_one_is_greedy(checkpoint):
    _, _, model, processor = checkpoint
    greedy = [r.token for r in stream_generate(model, processor, [2, 40, 41], max_tokens=10)]
    top_one = [r.token for r in stream_generate(model, processor, [2, 40, 41], max_tokens=10, temp=2.0, top_k=1, seed=3)]
    assert top_one == greedy


def test_prompt_past_the_context_is_refused(checkpoint):
    _, _, model, processor = checkpoint
    with pytest.raises(Gemma4Error, match="context holds 96"):
        next(stream_generate(model, processor, [40] * 96))


@pytest.mark.parametrize("bad_id", [-1, "vocab"])
def test_prompt_ids_outside_the_vocabulary_are_refused(checkpoint, bad_id):
    # MLX's gather reads whatever lies past the embedding table (a crash, or garbage): refused before anything runs.
    _, _, model, processor = checkpoint
    vocab = model.config.text_config.vocab_size
    with pytest.raises(Gemma4Error, match=rf"token ids must be in \[0, {vocab}\)"):
        next(stream_generate(model, processor, [2, 40, vocab if bad_id == "vocab" else bad_id]))


def test_max_tokens_is_cut_to_what_the_context_leaves(checkpoint):
    _, _, model, processor = checkpoint
    responses = list(stream_generate(model, processor, [40] * 90, max_tokens=50, sampler=lambda lp: mx.array([300])))
    assert len(responses) == 6


def test_streamed_text_never_splits_a_utf8_character(checkpoint):
    _, _, _, processor = checkpoint
    text = "東京 café 🙂!"
    byte_ids = [processor.tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in text.encode("utf-8")]
    steps = ((token, mx.zeros((1,))) for token in byte_ids)
    pieces = [r.text for r in stream_responses(steps, processor, prompt_tokens=1, max_tokens=len(byte_ids))]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_statistics_are_reported(checkpoint):
    _, _, model, processor = checkpoint
    last = list(stream_generate(model, processor, [2, 40, 41], max_tokens=5))[-1]
    assert last.prompt_tokens == 3 and last.generation_tokens == 5
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.time_to_first_token > 0
    assert last.peak_memory > 0 and last.from_draft is False


def test_prefill_chunks_never_cut_a_vision_block():
    blocks = mx.array([[-1, -1, 0, 0, 0, 0, -1, 1, 1, -1]])
    assert prefill_chunks(10, 4, blocks) == [(0, 2), (2, 6), (6, 10)]
    assert prefill_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    # A block longer than the step stays whole.
    assert prefill_chunks(8, 2, mx.array([[-1, 0, 0, 0, 0, -1, -1, -1]])) == [(0, 1), (1, 5), (5, 7), (7, 8)]


def forward_logprobs(model, ids: list) -> list:
    """Each position's log-probabilities from one uncompiled forward pass over `ids`."""
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@pytest.mark.parametrize("change", ["update", "load_weights"])
def test_decoding_sees_weights_replaced_after_an_earlier_generation(checkpoint, change):
    folder, _, _, _ = checkpoint
    model, _ = load(folder)
    prompt = [2, 40, 41, 42, 43]
    list(generate_step(mx.array(prompt), model, max_tokens=6))  # traces the compiled step with the old weights
    head = model.language_model.model.embed_tokens.weight
    new_head = head * 1.5 + 0.01
    if change == "update":
        model.language_model.model.embed_tokens.update({"weight": new_head})
    else:
        model.load_weights([("language_model.model.embed_tokens.weight", new_head)], strict=False)
    steps = list(generate_step(mx.array(prompt), model, max_tokens=6))
    tokens = [token for token, _ in steps]
    expected = forward_logprobs(model, prompt + tokens)[len(prompt) - 1 : -1]
    got = mx.stack([logprobs for _, logprobs in steps])
    assert mx.abs(got - expected).max().item() <= 1e-4
