"""On the GPU, a speculative verify pass gives bit for bit the logits of one-token steps, so greedy speculative
decoding emits exactly plain greedy decoding's tokens in bfloat16 (tests marked `gpu`: they skip where CUDA is
absent). Every product of a pass goes through kernels whose rows do not depend on the pass's other rows
(quantized_matvec.py, fused_norms.py, decode_attention.py); a single MLX operation that does not would fail these."""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.decode_step import decode_step
from mlx_gemma4.decoding import generate_step
from mlx_gemma4.speculative import DraftStatistics, speculative_generate_step
from gpu_fixtures import GPU_TEST_SHAPE, gpu_test_model

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def random_pair():
    return gpu_test_model()


def test_verify_passes_give_one_token_steps_logits_bit_for_bit(random_pair):
    """Twin caches after the same prompt: one advanced by passes of several tokens (rolled back as rejected drafts
    are), the other one token at a time; the prompt ends just before a full layer's buffer grows, so passes see the
    grown buffer where single steps did not yet."""
    model, _ = random_pair
    prompt = mx.arange(1010) % 4000 + 10
    passes, steps = model.make_cache(), model.make_cache()
    for cache in (passes, steps):
        mx.eval(model(prompt[None], cache=cache))
    verify, single = decode_step(model, passes), decode_step(model, steps)
    rng = np.random.default_rng(0)
    compared = 0
    for tokens, rejected in [(4, 1), (1, 0), (6, 5), (2, 0), (8, 3), (16, 9), (3, 0), (5, 2)] * 3:
        ids = mx.array(rng.integers(10, 4000, (1, tokens)), dtype=mx.int32)
        together = verify(ids)
        alone = mx.concatenate([single(ids[:, i:i + 1]) for i in range(tokens)], axis=1)
        assert together.dtype == mx.bfloat16
        assert mx.array_equal(together, alone), f"a pass of {tokens} after position {passes[0].offset - tokens}"
        compared += tokens
        for cache in passes + steps:
            cache.trim(rejected)
    assert passes[0].offset == steps[0].offset > 1024  # past the capacity step; the 81-slot rings wrapped 13 times
    assert compared > 100


@pytest.mark.parametrize("acceptance", [0.0, 0.7, 1.0])
def test_greedy_speculative_decoding_emits_plain_greedy_tokens(random_pair, acceptance):
    """With a drafter whose guesses are right as often as `acceptance` says (the bench's controlled drafter over a
    random assistant), adaptive and fixed draft lengths up to the longest pass the kernels take."""
    from controlled_drafter import ControlledDrafter
    from random_model import build_random_assistant

    model, config = random_pair
    prompt = mx.array(np.random.default_rng(1).integers(10, 4000, 300), dtype=mx.int32)
    plain = [token for token, _ in generate_step(prompt, model, max_tokens=80)]
    assistant = build_random_assistant(config, 4)
    for k in (None, 3, 15):
        drafter = ControlledDrafter(assistant, plain, prompt.size, acceptance, GPU_TEST_SHAPE["vocab_size"])
        statistics = DraftStatistics()
        speculative = [step[0] for step in speculative_generate_step(
            prompt, model, drafter, max_tokens=80, num_draft_tokens=k, statistics=statistics)]
        assert speculative == plain, f"K={k}"
        if acceptance == 1.0 and k is not None:
            assert statistics.tokens_per_pass > 2
