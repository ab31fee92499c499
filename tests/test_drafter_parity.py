"""The assistant drafter against the reference: logits and projected state from given target states, and from the
target's own states after a prompt, read as transformers' assisted generation reads them."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma4.drafter import load_drafter
from mlx_gemma4.loading import load
from mlx_gemma4.speculative import assistant_view, store_caches
from reference_models import save_reference_checkpoint
from speculative_fixtures import TARGET_HIDDEN, all_layers_reuse, save_reference_assistant

TOLERANCE = 1e-4
SLIDING_WINDOW = 6  # speculative_fixtures.assistant_text_config
# The compiled step reads a ring in slot order where the reference reads it in position order: 0 measured on this
# CPU (bench sums in the same order), but a backend may order the float32 sums differently. Ten times TOLERANCE.
COMPILED_TOLERANCE = 1e-3


@pytest.fixture(scope="module", params=[False, True], ids=["lm_head", "centroid_masked_head"])
def assistant(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("assistant")
    # The centroid head needs a vocabulary that splits evenly into the 8 clusters.
    vocab = 384 if request.param else 389
    reference = save_reference_assistant(folder, ordered=request.param, vocab_size=vocab, seed=3)
    return reference, load_drafter(folder)


def reference_draft(reference, embedding, hidden, target_kv, position):
    with torch.no_grad(), all_layers_reuse():
        out = reference(
            inputs_embeds=torch.from_numpy(np.concatenate([embedding, hidden], axis=-1)),
            position_ids=torch.tensor([[position]]),
            shared_kv_states={kind: (torch.from_numpy(k), torch.from_numpy(v)) for kind, (k, v) in target_kv.items()},
        )
    return out.logits.numpy(), out.last_hidden_state.numpy()


def random_target_states(rng, full_length, sliding_length):
    def pair(heads, length, dim):
        return tuple(rng.standard_normal((1, heads, length, dim)).astype(np.float32) for _ in range(2))

    embedding, hidden = (rng.standard_normal((1, 1, TARGET_HIDDEN)).astype(np.float32) for _ in range(2))
    target_kv = {"full_attention": pair(1, full_length, 20), "sliding_attention": pair(2, sliding_length, 12)}
    return embedding, hidden, target_kv


# Sliding key counts below, at and past the window + 1 the reference's sliding mask lets through.
@pytest.mark.parametrize("full_length,sliding_length", [(3, 3), (7, 7), (20, 12)])
def test_assistant_logits_and_state_match_the_reference_given_target_states(assistant, full_length, sliding_length):
    reference, drafter = assistant
    embedding, hidden, target_kv = random_target_states(np.random.default_rng(full_length), full_length, sliding_length)
    expected_logits, expected_state = reference_draft(reference, embedding, hidden, target_kv, full_length)
    logits, state = drafter(mx.array(embedding), mx.array(hidden),
                            {kind: (mx.array(k), mx.array(v)) for kind, (k, v) in target_kv.items()}, full_length)
    assert np.abs(np.array(logits) - expected_logits).max() <= TOLERANCE
    assert np.abs(np.array(state) - expected_state).max() <= TOLERANCE


def test_first_draft_from_our_target_matches_the_reference_pair(tmp_path, assistant):
    """As SinglePositionMultiTokenCandidateGenerator drafts after the prompt: the target's final-normed hidden state
    of the last prompt token, the scaled target embedding of the first generated token at position len(prompt),
    and the target's shared KV. The reference target stores KV only when it shares layers, hence 2 shared here."""
    reference_assistant, drafter = assistant
    vocab = reference_assistant.config.text_config.vocab_size
    reference_target = save_reference_checkpoint(
        tmp_path, dict(num_kv_shared_layers=2, vocab_size=vocab), vision=False, audio=False, seed=4
    )
    target, _ = load(tmp_path)
    prompt = list(range(20, 20 + 3 * SLIDING_WINDOW))

    with torch.no_grad():
        out = reference_target(input_ids=torch.tensor([prompt]), output_hidden_states=True,
                               return_shared_kv_states=True)
        first_token = int(out.logits[0, -1].argmax())
        embedding = reference_target.get_input_embeddings()(torch.tensor([[first_token]])).numpy()
    hidden = out.hidden_states[-1][:, -1:].numpy()
    shared = {kind: (k.numpy(), v.numpy()) for kind, (k, v) in out.shared_kv_states.items()}
    expected_logits, expected_state = reference_draft(reference_assistant, embedding, hidden, shared, len(prompt))

    cache = target.make_cache()
    logits, our_hidden = target(mx.array([prompt]), cache=cache, return_hidden=True)
    assert int(mx.argmax(logits[0, -1]).item()) == first_token
    target_kv = {kind: c.keys_and_values() for kind, c in store_caches(target, cache).items()}
    embed = target.language_model.model.embed(mx.array([[first_token]]))
    draft_logits, state = drafter(embed, our_hidden[:, -1:], target_kv, len(prompt))
    assert np.abs(np.array(draft_logits) - expected_logits).max() <= TOLERANCE
    assert np.abs(np.array(state) - expected_state).max() <= TOLERANCE


def test_the_compiled_step_over_whole_buffers_drafts_as_the_step_over_rows_in_order(assistant, tmp_path):
    """What the speculative loop hands the assistant (speculative.assistant_view: the store layers' whole buffers and
    masks, one compiled step) against the rows in order (keys_and_values), as the rings wrap and rolled-back drafts
    leave rows behind the offset: the same logits and state, up to the float sums' order. (Quantized buffers: the
    speculative loop over an 8-bit cache in test_kv_quantization.py.)"""
    _, drafter = assistant
    vocab = drafter.config.text_config.vocab_size
    save_reference_checkpoint(tmp_path, dict(num_kv_shared_layers=2, vocab_size=vocab), vision=False, audio=False,
                              seed=4)
    target, _ = load(tmp_path)
    cache = target.make_cache()
    _, hidden = target(mx.array([list(range(20, 20 + 3 * SLIDING_WINDOW))]), cache=cache, return_hidden=True)
    stores = store_caches(target, cache)
    embed = target.language_model.model.embed
    worst, compared = 0.0, 0
    for fed, rolled_back in [(5, 2), (2 * SLIDING_WINDOW + 3, 4), (1, 0), (9, 9), (3, 1)]:
        target(mx.array([list(range(30, 30 + fed))]), cache=cache)
        for layer_cache in cache:
            layer_cache.trim(rolled_back)
        position = cache[0].offset
        token = embed(mx.array([[7 + position % 50]]))
        in_order = {kind: layer_cache.keys_and_values() for kind, layer_cache in stores.items()}
        expected = drafter(token, hidden[:, -1:], in_order, position)
        buffers, masks = assistant_view(stores, mx.array([position]))
        got = drafter(token, hidden[:, -1:], buffers, position, masks)
        for ours, theirs in zip(got, expected):
            worst = max(worst, mx.abs(ours - theirs).max().item())
        compared += 1
    assert compared == 5 and "draft" in drafter.compiled_steps.functions
    print(f"worst difference, whole buffers against rows in order: {worst:.2e}")
    assert worst < COMPILED_TOLERANCE
