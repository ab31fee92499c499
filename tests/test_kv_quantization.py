"""Quantized key/value caches (kv_bits): close to full precision, and the same through every path that reads them
(step by step, the compiled step, the speculative loop), with the quantization switched on mid-generation too."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import decode_step
from mlx_gemma4.drafter import load_drafter
from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.generation import stream_generate
from mlx_gemma4.loading import load
from reference_models import save_reference_checkpoint
from speculative_fixtures import save_reference_assistant

# Head sizes that groups of 32 divide; a window the prompt passes many times.
HEADS = dict(head_dim=32, global_head_dim=64, sliding_window=4)
GROUP_SIZE = 32
PROMPT = list(range(20, 60))
DECODED = 16
# Mean KL from the full-precision distributions, measured on this random checkpoint: 8-bit 4.3e-4, 4-bit 4.9e-2.
MEAN_KL_BOUND = {8: 1e-3, 4: 0.1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv_quantization")
    save_reference_checkpoint(folder, HEADS, vision=False, audio=False, seed=11)
    model, processor = load(folder)
    processor.stop_token_ids = set()  # random models stop at random places
    return folder, model, processor


def decode_logprobs(model, cache, ids, prefill: int, compiled: bool) -> np.ndarray:
    """Log-probabilities at every position: the first `prefill` ids in chunks of 8, then one-token steps."""
    pieces = [model(mx.array([ids[s : min(s + 8, prefill)]]), cache=cache) for s in range(0, prefill, 8)]
    step = decode_step.decode_step(model, cache) if compiled else (lambda token: model(token, cache=cache))
    pieces += [step(mx.array([[token]])) for token in ids[prefill:]]
    logits = mx.concatenate(pieces, axis=1)[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def kl_divergence(exact: np.ndarray, approximate: np.ndarray) -> np.ndarray:
    return (np.exp(exact) * (exact - approximate)).sum(axis=-1)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_stays_close_to_full_precision(checkpoint, bits):
    _, model, _ = checkpoint
    ids = PROMPT + list(range(100, 100 + DECODED))
    exact = decode_logprobs(model, model.make_cache(), ids, len(PROMPT), compiled=True)
    quantized = decode_logprobs(model, model.make_cache(kv_bits=bits, kv_group_size=GROUP_SIZE), ids, len(PROMPT),
                                compiled=True)
    kl = kl_divergence(exact, quantized)
    print(f"{bits}-bit KV: mean KL {kl.mean():.2e}, max {kl.max():.2e}, "
          f"top-1 agreement {(exact.argmax(-1) == quantized.argmax(-1)).mean():.3f}")
    assert 0 < kl.mean() <= MEAN_KL_BOUND[bits]


@pytest.mark.parametrize("start", [0, 30, 45], ids=["from_the_start", "during_the_prompt", "while_decoding"])
def test_compiled_step_on_quantized_caches_matches_step_by_step(checkpoint, start):
    """The compiled step reads and writes the quantized buffers (full layers and sliding rings) as the plain
    forward does, including when the caches switch to quantized between two steps."""
    _, model, _ = checkpoint
    ids = PROMPT + list(range(100, 100 + DECODED))
    options = dict(kv_bits=8, kv_group_size=GROUP_SIZE, quantized_kv_start=start)
    compiled = decode_logprobs(model, model.make_cache(**options), ids, len(PROMPT), compiled=True)
    step_by_step = decode_logprobs(model, model.make_cache(**options), ids, len(PROMPT), compiled=False)
    assert np.abs(compiled - step_by_step).max() <= 1e-4


def test_speculative_greedy_on_quantized_caches_equals_plain_greedy_on_them(checkpoint, tmp_path):
    folder, model, processor = checkpoint
    assistant = tmp_path / "assistant"
    save_reference_assistant(assistant, seed=12, head_dim=HEADS["head_dim"], global_head_dim=HEADS["global_head_dim"],
                             sliding_window=HEADS["sliding_window"])
    options = dict(max_tokens=24, kv_bits=8, kv_group_size=GROUP_SIZE)
    plain = [r.token for r in stream_generate(model, processor, PROMPT, **options)]
    speculative = [r.token for r in stream_generate(model, processor, PROMPT, draft_model=load_drafter(assistant),
                                                   num_draft_tokens=3, **options)]
    assert speculative == plain


def test_a_conversation_on_a_quantized_cache_sees_what_one_pass_over_it_sees(checkpoint):
    """Each key row is quantized on its own, so a second turn on the cache of a first (prompt and reply) reads the
    rows one prefill of the whole conversation writes."""
    _, model, processor = checkpoint
    options = dict(kv_bits=8, kv_group_size=GROUP_SIZE)
    cache, follow_up = model.make_cache(), [70, 71, 72]
    reply = [r.token for r in stream_generate(model, processor, PROMPT, max_tokens=6, prompt_cache=cache, **options)]
    second_turn = next(stream_generate(model, processor, follow_up, max_tokens=1, prompt_cache=cache, **options))
    conversation = PROMPT + reply + follow_up
    logits = model(mx.array([conversation]), cache=model.make_cache(**options))[0, -1].astype(mx.float32)
    expected = logits - mx.logsumexp(logits)
    # Measured 3.3e-6 (float rounding in another order); bounded at about 10x that.
    assert mx.abs(second_turn.logprobs - expected).max().item() <= 3e-5


@pytest.mark.parametrize("options,message", [
    (dict(kv_bits=3), "kv_bits must be one of 4, 8"),
    (dict(kv_bits=8, kv_group_size=48), "kv_group_size must be one of"),
    (dict(kv_bits=8, quantized_kv_start=-1), "quantized_kv_start must be 0 or more"),
])
def test_bad_kv_quantization_options_raise_our_error(checkpoint, options, message):
    _, model, processor = checkpoint
    with pytest.raises(Gemma4Error, match=message):
        next(stream_generate(model, processor, PROMPT, max_tokens=2, **options))


def test_a_head_size_the_group_does_not_divide_raises_our_error(checkpoint):
    _, model, processor = checkpoint
    with pytest.raises(Gemma4Error, match="cannot be quantized in groups of 128"):
        next(stream_generate(model, processor, PROMPT, max_tokens=2, kv_bits=8, kv_group_size=128))


def test_dequantized_blocks_compute_what_quantized_matmuls_compute(checkpoint, monkeypatch):
    """Where the backend has no batched quantized matmul (MLX's CUDA backend), each key block is dequantized first:
    the same logits, whichever path runs."""
    from mlx_gemma4 import attention

    _, model, _ = checkpoint
    ids = PROMPT + list(range(100, 100 + DECODED))
    logprobs = {}
    for lacks in (False, True):
        monkeypatch.setattr(attention, "lacks_batched_quantized_matmul", lambda: lacks)
        cache = model.make_cache(kv_bits=8, kv_group_size=GROUP_SIZE)
        logprobs[lacks] = decode_logprobs(model, cache, ids, len(PROMPT), compiled=False)
    assert np.abs(logprobs[True] - logprobs[False]).max() <= 1e-4
