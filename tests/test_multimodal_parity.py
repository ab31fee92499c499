"""Images, audio and video through the projection embedder give transformers' Gemma4Unified logits."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.decoding import generate_step, prefill_chunks
from mlx_gemma4.generation import stream_generate
from mlx_gemma4.loading import load
from mlx_gemma4.multimodal import audio_soft_tokens, block_ids_for, media_prompt, vision_soft_tokens
from mlx_gemma4.processor import Processor
from mlx_gemma4.video_processing import Video
from multimodal_fixtures import DATA, PromptBuilder, reference_inputs
from reference_models import FLOAT32_TOLERANCE, reference_logits, save_reference_checkpoint


PROMPTS = {
    "image": lambda b: b.text(3).image(3, 2, 8).text(4),
    # A 3x3 image is longer than the sliding window (6): its block must still see itself whole.
    "image_wider_than_window": lambda b: b.text(2).image(3, 3, 9).text(3),
    "two_images": lambda b: b.text(2).image(2, 2, 6).text(1).image(3, 1, 6).text(2),
    "audio": lambda b: b.text(3).audio_clip(5).text(4),
    "two_audio_clips": lambda b: b.text(1).audio_clip(4).text(1).audio_clip(2).text(2),
    "video": lambda b: b.text(3).video(2, 2, 3, 8).text(3),
    "image_audio_video_text": lambda b: b.text(3).image(3, 2, 8).text(2).audio_clip(5).text(2).video(2, 2, 2, 8)
    .text(3),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multimodal")
    reference = save_reference_checkpoint(folder)
    model, processor = load(folder)
    return folder, reference, model, processor


def prompt_inputs(folder, name: str) -> dict:
    return PROMPTS[name](PromptBuilder(folder, seed=len(name))).inputs()


def max_difference(ours, theirs) -> float:
    return float(np.abs(np.array(ours) - np.asarray(theirs)).max())


def test_vision_embedder_matches_reference(checkpoint):
    folder, reference, model, _ = checkpoint
    inputs = prompt_inputs(folder, "two_images")
    with torch.no_grad():
        expected = reference.model.get_image_features(
            torch.from_numpy(inputs["pixel_values"]), torch.from_numpy(inputs["image_position_ids"])
        ).pooler_output
    ours = vision_soft_tokens(model, inputs["pixel_values"], inputs["image_position_ids"], "image")
    assert max_difference(ours, torch.cat(expected).numpy()) <= FLOAT32_TOLERANCE


def test_audio_embedder_matches_reference(checkpoint):
    folder, reference, model, _ = checkpoint
    inputs = prompt_inputs(folder, "two_audio_clips")
    with torch.no_grad():
        features = reference.model.embed_audio(torch.from_numpy(inputs["input_features"]))
        expected = features[torch.from_numpy(inputs["input_features_mask"])].numpy()
    ours = audio_soft_tokens(model, inputs["input_features"], inputs["input_features_mask"])
    assert max_difference(ours, expected) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_logits_match_reference(checkpoint, name):
    folder, reference, model, _ = checkpoint
    inputs = prompt_inputs(folder, name)
    ids = inputs.pop("input_ids")
    expected = reference_logits(reference, ids, **inputs)
    assert max_difference(model(mx.array(ids), **inputs), expected) <= FLOAT32_TOLERANCE


def test_without_token_types_attention_stays_causal_as_in_reference(checkpoint):
    folder, reference, model, _ = checkpoint
    inputs = prompt_inputs(folder, "image_audio_video_text")
    ids = inputs.pop("input_ids")
    inputs.pop("mm_token_type_ids")
    expected = reference_logits(reference, ids, **inputs)
    assert max_difference(model(mx.array(ids), **inputs), expected) <= FLOAT32_TOLERANCE


def test_chunked_prefill_keeps_vision_blocks_whole_and_matches_full_forward(checkpoint):
    folder, reference, model, _ = checkpoint
    inputs = prompt_inputs(folder, "image_audio_video_text")
    ids = inputs.pop("input_ids")
    expected = reference_logits(reference, ids, **inputs)
    block_ids = block_ids_for(model.config, inputs.pop("mm_token_type_ids"))
    embeddings = model.embed_inputs(mx.array(ids), **inputs)
    chunks = prefill_chunks(ids.shape[1], 4, block_ids)
    blocks = np.array(block_ids)[0]
    for start, end in chunks[1:]:
        assert blocks[start] < 0 or blocks[start] != blocks[start - 1], "a chunk boundary cut a vision block"
    cache = model.make_cache()
    pieces = [model(input_embeddings=embeddings[:, s:e], cache=cache, block_ids=block_ids[:, s:e]) for s, e in chunks]
    assert max_difference(mx.concatenate(pieces, axis=1), expected) <= FLOAT32_TOLERANCE


def test_generate_step_first_token_matches_reference_with_small_prefill_steps(checkpoint):
    folder, reference, model, _ = checkpoint
    inputs = prompt_inputs(folder, "image_wider_than_window")
    ids = inputs.pop("input_ids")
    expected = reference_logits(reference, ids, **inputs)[0, -1]
    block_ids = block_ids_for(model.config, inputs.pop("mm_token_type_ids"))
    embeddings = model.embed_inputs(mx.array(ids), **inputs)
    steps = generate_step(mx.array(ids[0]), model, max_tokens=1, prefill_step_size=3,
                          input_embeddings=embeddings, block_ids=block_ids)
    token, logprobs = next(steps)
    expected_logprobs = expected - np.log(np.exp(expected - expected.max()).sum()) - expected.max()
    assert token == int(expected.argmax())
    assert max_difference(logprobs, expected_logprobs) <= FLOAT32_TOLERANCE


def test_later_turns_with_cache_match_full_forward(checkpoint):
    """The image sits in the first turn; the next turns reuse the cache and carry no media token types."""
    folder, reference, model, _ = checkpoint
    first = PromptBuilder(folder, seed=5).text(2).image(3, 3, 9).text(3)
    inputs = first.inputs()
    turns = [np.random.default_rng(turn).integers(300, 380, size=(1, length)) for turn, length in ((1, 7), (2, 4))]
    whole = np.concatenate([inputs["input_ids"], *turns], axis=1)
    types = np.concatenate([inputs["mm_token_type_ids"], *[np.zeros_like(t) for t in turns]], axis=1)
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "mm_token_type_ids")}
    expected = reference_logits(reference, whole, mm_token_type_ids=types, **media)

    cache = model.make_cache()
    block_ids = block_ids_for(model.config, inputs["mm_token_type_ids"])
    embeddings = model.embed_inputs(mx.array(inputs["input_ids"]), **media)
    pieces = [model(input_embeddings=embeddings[:, s:e], cache=cache, block_ids=block_ids[:, s:e])
              for s, e in prefill_chunks(embeddings.shape[1], 5, block_ids)]
    pieces += [model(mx.array(turn), cache=cache) for turn in turns]
    assert max_difference(mx.concatenate(pieces, axis=1), expected) <= FLOAT32_TOLERANCE


def test_processor_output_gives_reference_logits_on_a_photograph_and_audio(checkpoint):
    folder, reference, model, processor = checkpoint
    prompt = processor.chat_prompt("What do you see and hear?", images=1, audio=1)
    clip = np.sin(np.linspace(0, 300, 3000)).astype(np.float32)
    inputs = processor(prompt, images=[DATA / "tiny.png"], audio=[clip])
    ids = np.array(inputs.pop("input_ids"))
    expected = reference_logits(reference, ids, **{k: np.array(v) for k, v in inputs.items()})
    assert max_difference(model(mx.array(ids), **inputs), expected) <= FLOAT32_TOLERANCE


def test_model_takes_the_processor_output_as_it_is(checkpoint):
    _, _, model, processor = checkpoint
    inputs = processor(processor.chat_prompt("Look.", images=1), images=[DATA / "tiny.png"])
    logits = model(**inputs)
    assert logits.shape[:2] == inputs["input_ids"].shape
    padded = dict(inputs, attention_mask=mx.concatenate([mx.zeros((1, 1), mx.int32), inputs["attention_mask"][:, 1:]], 1))
    with pytest.raises(Gemma4Error, match="padded prompts"):
        model(**padded)


def test_prompt_expansion_matches_reference_processor(checkpoint):
    """Token ids and media token types equal the reference processor's for two images, audio and a video."""
    _, _, model, _ = checkpoint
    # BPE training breaks ties at random: the tokenizer the reference used is the one kept in tests/data.
    processor = Processor(load_tokenizer(DATA / "tokenizer"), model.config, stop_token_ids=set())
    reference = np.load(DATA / "reference_arrays.npz")
    notes = json.loads(str(reference["notes"]))
    indices = reference["video:frame_indices"]
    video = Video(reference_inputs.video_frames()[indices], notes["video:timestamps"])
    text = "<bos>Look:<|image|> then<|image|>, hear<|audio|> and watch<|video|> now."
    inputs = processor(text, images=[DATA / "rocket.jpg", DATA / "tiny.png"], audio=[reference_inputs.audio_clip()],
                       videos=[video])
    assert np.array(inputs["input_ids"]).tolist() == reference["processor:input_ids"].tolist()
    assert np.array(inputs["mm_token_type_ids"]).tolist() == reference["processor:mm_token_type_ids"].tolist()
    assert np.array(inputs["input_features_mask"]).tolist() == reference["processor:input_features_mask"].tolist()
    assert reference_inputs.digest(np.array(inputs["pixel_values"])) == notes["processor:pixel_values:sha256"]
    assert reference_inputs.digest(np.array(inputs["input_features"])) == notes["processor:input_features:sha256"]


def test_media_without_text_are_processed_as_the_reference_processor_does(checkpoint):
    """Gemma4UnifiedProcessor, given media alone, writes one placeholder per item joined by spaces and returns the
    media's arrays with the expanded prompt; the arrays equal those the reference made with text around them."""
    _, _, model, _ = checkpoint
    processor = Processor(load_tokenizer(DATA / "tokenizer"), model.config, stop_token_ids=set())
    reference = np.load(DATA / "reference_arrays.npz")
    notes = json.loads(str(reference["notes"]))
    images, audio = [DATA / "rocket.jpg", DATA / "tiny.png"], [reference_inputs.audio_clip()]

    alone = processor(images=images)
    assert reference_inputs.digest(np.array(alone["pixel_values"])) == notes["processor:pixel_values:sha256"]
    with_placeholders = processor("<|image|> <|image|>", images=images)
    assert sorted(alone) == sorted(with_placeholders)
    for name in alone:
        assert np.array_equal(np.array(alone[name]), np.array(with_placeholders[name])), name

    alone = processor(audio=audio)
    assert np.array(alone["input_features_mask"]).tolist() == reference["processor:input_features_mask"].tolist()
    assert reference_inputs.digest(np.array(alone["input_features"])) == notes["processor:input_features:sha256"]
    assert np.array(alone["input_ids"]).tolist() == np.array(processor("<|audio|>", audio=audio)["input_ids"]).tolist()


def test_the_processor_without_text_or_media_is_a_clear_error(checkpoint):
    with pytest.raises(Gemma4Error, match="needs text, media, or both"):
        checkpoint[3]()


def test_stream_generate_with_an_image_starts_with_the_reference_token(checkpoint):
    folder, reference, model, processor = checkpoint
    prompt = processor.chat_prompt("Describe it.", images=1)
    inputs = processor(prompt, images=[DATA / "camera_grey.png"])
    ids = np.array(inputs.pop("input_ids"))
    expected = reference_logits(reference, ids, **{k: np.array(v) for k, v in inputs.items()})[0, -1]
    response = next(stream_generate(model, processor, prompt, images=[DATA / "camera_grey.png"], max_tokens=1,
                                    prefill_step_size=64))
    assert response.token == int(expected.argmax())
    assert response.prompt_tokens == ids.shape[1]


def test_media_past_the_context_is_a_clear_error(checkpoint, monkeypatch):
    _, _, model, processor = checkpoint
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", 100)
    prompt = processor.chat_prompt("Describe it.", images=1)
    with pytest.raises(Gemma4Error, match="context holds 100"):
        next(stream_generate(model, processor, prompt, images=[DATA / "tiny.png"]))


def test_placeholder_count_must_match_the_media(checkpoint):
    _, _, model, processor = checkpoint
    prompt = processor.chat_prompt("Two?", images=1)
    with pytest.raises(Gemma4Error, match="1 <\\|image\\|> placeholder"):
        media_prompt(model, processor, prompt, images=[DATA / "tiny.png", DATA / "tiny.png"])


def test_command_line_takes_images_and_audio(checkpoint, capsys, tmp_path):
    import soundfile

    from mlx_gemma4.cli import main

    folder = checkpoint[0]
    clip = tmp_path / "clip.wav"
    soundfile.write(clip, np.sin(np.linspace(0, 200, 4000)).astype(np.float32), 16_000)
    code = main(["--model", str(folder), "--prompt", "What is here?", "--image", str(DATA / "tiny.png"), "--image",
                 str(DATA / "logo_rgba.png"), "--audio", str(clip), "--max-tokens", "3", "--verbose", "false"])
    assert code == 0
    assert capsys.readouterr().err == ""


def test_command_line_bad_image_is_one_line_and_nonzero(checkpoint, capsys, tmp_path):
    from mlx_gemma4.cli import main

    broken = tmp_path / "broken.png"
    broken.write_bytes((DATA / "tiny.png").read_bytes()[:100])
    code = main(["--model", str(checkpoint[0]), "--prompt", "Hi", "--image", str(broken)])
    error = capsys.readouterr().err
    assert code == 1
    assert error.count("\n") == 1 and error.startswith("error: ") and "broken.png" in error
