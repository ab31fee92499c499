"""Speculative decoding is lossless: greedy output equals plain greedy output token for token (any draft length,
across the sliding window, with drafters that are always right or always wrong), it stops where plain decoding
stops, and sampled tokens follow the target's own filtered distribution."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.draft_policy import DraftPolicy
from mlx_gemma4.drafter import load_drafter
from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.generation import stream_generate
from mlx_gemma4.kv_cache import WindowCache
from mlx_gemma4.loading import load
from mlx_gemma4.speculative import DraftStatistics, make_filter, speculative_generate_step
from multimodal_fixtures import DATA
from reference_models import save_reference_checkpoint
from speculative_fixtures import SLIDING_WINDOW, ScriptedDrafter, save_reference_assistant, save_small_window_target

# Long enough to pass the sliding window many times over, and the rollback margin too.
GENERATED = 40
PROMPT = list(range(20, 31))


@pytest.fixture(scope="module")
def target_folder(tmp_path_factory):
    return save_small_window_target(tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory, target_folder):
    return build_pair(tmp_path_factory, target_folder)


def build_pair(tmp_path_factory, target_folder):
    assistant_folder = tmp_path_factory.mktemp("assistant")
    save_reference_assistant(assistant_folder, seed=8, sliding_window=SLIDING_WINDOW)
    model, processor = load(target_folder)
    processor.stop_token_ids = set()  # random models stop at random places; these tests choose their stops
    plain = [r.token for r in stream_generate(model, processor, PROMPT, max_tokens=GENERATED)]
    return model, processor, load_drafter(assistant_folder), plain


def speculative_tokens(model, processor, drafter, **options):
    statistics = DraftStatistics()
    responses = list(stream_generate(model, processor, PROMPT, draft_model=drafter, draft_statistics=statistics,
                                     **{"max_tokens": GENERATED, **options}))
    return [r.token for r in responses], [r.from_draft for r in responses], statistics


@pytest.mark.parametrize("num_draft_tokens", [1, 2, 3, 4, 5, 6, None], ids=lambda k: f"K={k or 'adaptive'}")
def test_greedy_speculative_output_equals_plain_greedy_past_the_window(pair, num_draft_tokens):
    model, processor, drafter, plain = pair
    tokens, _, _ = speculative_tokens(model, processor, drafter, num_draft_tokens=num_draft_tokens)
    assert tokens == plain


@pytest.mark.parametrize("num_draft_tokens", [2, 5, None], ids=lambda k: f"K={k or 'adaptive'}")
def test_an_always_right_drafter_is_accepted_whole_and_matches(pair, num_draft_tokens):
    model, processor, drafter, plain = pair
    oracle = ScriptedDrafter(drafter, PROMPT + plain)
    tokens, from_draft, statistics = speculative_tokens(model, processor, oracle, num_draft_tokens=num_draft_tokens)
    assert tokens == plain
    assert statistics.accepted == statistics.drafted > 0
    assert sum(from_draft) == statistics.accepted
    if num_draft_tokens:
        # Every pass but the last yields its K drafts plus the target's own token.
        assert statistics.target_passes == -(-(GENERATED - 1) // (num_draft_tokens + 1))
    # Every verify pass is timed once, under its draft length.
    assert sum(len(seconds) for seconds in statistics.round_seconds.values()) == statistics.target_passes
    assert all(second > 0 for seconds in statistics.round_seconds.values() for second in seconds)


def test_an_always_wrong_drafter_is_never_accepted_and_matches(pair):
    model, processor, drafter, plain = pair
    wrong = ScriptedDrafter(drafter, PROMPT + plain, wrong=True)
    tokens, from_draft, statistics = speculative_tokens(model, processor, wrong, num_draft_tokens=3)
    assert tokens == plain
    assert statistics.accepted == 0 and not any(from_draft)
    assert statistics.target_passes == GENERATED - 1


def test_the_adaptive_length_sets_an_always_wrong_drafter_aside(pair, monkeypatch):
    model, processor, drafter, plain = pair
    wrong = ScriptedDrafter(drafter, PROMPT + plain, wrong=True)
    # Round times from a cost curve rather than this busy machine's clock: the choice is then reproducible.
    record = DraftPolicy.record
    monkeypatch.setattr(DraftPolicy, "record", lambda self, drafted, accepted, seconds=None: record(
        self, drafted, accepted, 1 + 0.3 * drafted))
    tokens, _, statistics = speculative_tokens(model, processor, wrong, max_tokens=3 * GENERATED)
    assert tokens == plain + tokens[GENERATED:] and len(tokens) == 3 * GENERATED
    # Trying K = 1 and K = 0 costs a few drafts; after that only the periodic probes draft. (Each change of length
    # takes effect a round late, since the next round is queued before this one is read: 13 drafts here, 9 before.)
    assert statistics.drafted < GENERATED // 2


def test_plain_rounds_chain_on_the_lazy_token_and_match_greedy(pair, monkeypatch):
    model, processor, drafter, plain = pair
    monkeypatch.setattr(DraftPolicy, "next", lambda self, remaining: 0)
    tokens, from_draft, statistics = speculative_tokens(model, processor, drafter)
    assert tokens == plain and not any(from_draft)
    assert statistics.drafted == 0 and statistics.target_passes == GENERATED - 1


def test_every_slice_a_round_takes_is_made_on_the_generation_stream(pair, monkeypatch):
    """A round's arrays all come from one stream: within one evaluation MLX fences an input made on another stream by
    waiting on the host, which on CUDA stalls the hand-over of a round until the GPU finished the round before."""
    from mlx_gemma4.decoding import generation_stream

    model, _, drafter, plain = pair
    lengths = iter([0, 2] * GENERATED)  # plain rounds chained on the lazy token, and verify passes
    monkeypatch.setattr(DraftPolicy, "next", lambda self, remaining: min(next(lengths), max(0, remaining - 1)))
    streams, index = [], mx.array.__getitem__

    def recorded(array, key):
        streams.append(mx.default_stream(mx.default_device()))
        return index(array, key)

    monkeypatch.setattr(mx.array, "__getitem__", recorded)
    tokens = [token for token, *_ in speculative_generate_step(mx.array(PROMPT), model, drafter,
                                                               max_tokens=GENERATED)]
    monkeypatch.undo()
    assert tokens == plain
    assert streams and all(stream == generation_stream for stream in streams)


def test_generation_stops_exactly_at_max_tokens_inside_an_accepted_run(pair):
    model, processor, drafter, plain = pair
    oracle = ScriptedDrafter(drafter, PROMPT + plain)
    for max_tokens in (1, 2, 9, 10):
        tokens, _, _ = speculative_tokens(model, processor, oracle, num_draft_tokens=6, max_tokens=max_tokens)
        assert tokens == plain[:max_tokens]


def test_generation_stops_at_a_stop_token_inside_an_accepted_run(pair):
    model, processor, drafter, plain = pair
    oracle = ScriptedDrafter(drafter, PROMPT + plain)
    stop = plain[9]
    processor.stop_token_ids = {stop}
    try:
        tokens, from_draft, _ = speculative_tokens(model, processor, oracle, num_draft_tokens=6)
    finally:
        processor.stop_token_ids = set()
    assert tokens == plain[: plain.index(stop) + 1]
    assert from_draft[-1]


def test_greedy_speculative_output_is_unchanged_by_prefill_chunks(pair):
    model, processor, drafter, plain = pair
    tokens, _, _ = speculative_tokens(model, processor, drafter, num_draft_tokens=3, prefill_step_size=3)
    assert tokens == plain


def test_an_assistant_for_another_target_width_or_vocabulary_is_refused(pair, tmp_path):
    model, processor, _, _ = pair
    for name, options in (("width", dict(backbone=40)), ("vocabulary", dict(vocab_size=300))):
        folder = tmp_path / name
        save_reference_assistant(folder, **options)
        with pytest.raises(Gemma4Error, match=name if name == "vocabulary" else "hidden size"):
            list(stream_generate(model, processor, PROMPT, draft_model=load_drafter(folder), max_tokens=4))


@pytest.fixture(scope="module")
def vision_pair(tmp_path_factory):
    target_folder = tmp_path_factory.mktemp("vision_target")
    save_reference_checkpoint(target_folder, dict(sliding_window=SLIDING_WINDOW), audio=False, seed=9)
    assistant_folder = tmp_path_factory.mktemp("vision_assistant")
    save_reference_assistant(assistant_folder, seed=10, sliding_window=SLIDING_WINDOW)
    model, processor = load(target_folder)
    processor.stop_token_ids = set()
    return model, processor, load_drafter(assistant_folder)


def test_greedy_speculative_output_equals_plain_greedy_with_an_image_in_the_prompt(vision_pair):
    model, processor, drafter = vision_pair
    prompt = processor.chat_prompt("Describe it.", images=1)
    options = dict(images=[DATA / "tiny.png"], max_tokens=16, prefill_step_size=8)
    plain = [r.token for r in stream_generate(model, processor, prompt, **options)]
    for candidate in (drafter, ScriptedDrafter(drafter, processor(prompt, images=options["images"])["input_ids"][0]
                                               .tolist() + plain)):
        statistics = DraftStatistics()
        tokens = [r.token for r in stream_generate(model, processor, prompt, draft_model=candidate,
                                                   num_draft_tokens=3, draft_statistics=statistics, **options)]
        assert tokens == plain
    assert statistics.accepted == statistics.drafted > 0


# Sampling: the first two tokens of each run (the first from the prefill, the second from the rejection rule), on
# top-3 filtered distributions sharpened by a low temperature, so 9 outcomes. The exact target distribution is
# computed directly.
# The drafter double proposes from a fixed distribution over the target's candidate second tokens that differs from
# the target's, so drafts are accepted in some runs and rejected in others.
SAMPLING = dict(temp=0.5, top_k=3)
RUNS = 500
# Total variation between the empirical and the exact distribution over 9 outcomes: about 0.05 expected at 500 runs;
# 0.12 is past 4 standard deviations. Accepting drafts blindly lands far beyond it (asserted below).
TV_BOUND = 0.12


class FixedDistributionDrafter:
    def __init__(self, logits: mx.array):
        self.logits = logits

    def compiled_step(self):
        return self  # the speculative loop calls it as a Drafter's compiled step

    def __call__(self, token_embedding, target_hidden, target_kv, position, masks=None):
        return self.logits, target_hidden


def exact_two_token_distribution(model, filter_logits) -> dict:
    first = mx.exp(filter_logits(model(mx.array([PROMPT]))[0, -1]))
    distribution = {}
    for token in np.nonzero(np.array(first) > 0)[0].tolist():
        second = mx.exp(filter_logits(model(mx.array([PROMPT + [token]]))[0, -1]))
        for next_token in np.nonzero(np.array(second) > 0)[0].tolist():
            distribution[(token, next_token)] = float(first[token]) * float(second[next_token])
    return distribution


def total_variation(counts: dict, exact: dict) -> float:
    total = sum(counts.values())
    keys = set(counts) | set(exact)
    return 0.5 * sum(abs(counts.get(k, 0) / total - exact.get(k, 0.0)) for k in keys)


def test_speculative_sampling_follows_the_targets_filtered_distribution(pair):
    model, _, _, _ = pair
    filter_logits = make_filter(SAMPLING["temp"], 0.0, SAMPLING["top_k"], 0.0)
    exact = exact_two_token_distribution(model, filter_logits)
    vocab = model.config.text_config.vocab_size
    candidates = sorted({second for _, second in exact})
    rng = np.random.default_rng(1)
    logits = np.full((1, 1, vocab), -30.0, dtype=np.float32)
    logits[..., candidates] = rng.standard_normal(len(candidates))
    drafter = FixedDistributionDrafter(mx.array(logits))

    mx.random.seed(0)
    counts, accepted = {}, 0
    for _ in range(RUNS):
        # Three tokens, so that the round after the prefill may draft one (a round never drafts past max_tokens).
        steps = list(speculative_generate_step(mx.array(PROMPT), model, drafter, max_tokens=3, num_draft_tokens=1,
                                               **SAMPLING))
        tokens = tuple(step[0] for step in steps[:2])
        counts[tokens] = counts.get(tokens, 0) + 1
        accepted += steps[1][2]
    assert total_variation(counts, exact) < TV_BOUND
    assert 0.1 * RUNS < accepted < 0.9 * RUNS

    # The test has teeth: taking the drafter's proposals as they come would be far from the target's distribution.
    draft = mx.exp(filter_logits(drafter.logits[0, -1]))
    first = {token for token, _ in exact}
    first_probability = {token: sum(p for (t, _), p in exact.items() if t == token) for token in first}
    blind = {(t, s): first_probability[t] * float(draft[s]) for t in first for s in candidates if float(draft[s]) > 0}
    assert total_variation({k: v * RUNS for k, v in blind.items()}, exact) > 2 * TV_BOUND


def test_plain_rounds_sample_the_targets_filtered_distribution(pair, monkeypatch):
    model, _, drafter, _ = pair
    monkeypatch.setattr(DraftPolicy, "next", lambda self, remaining: 0)
    exact = exact_two_token_distribution(model, make_filter(SAMPLING["temp"], 0.0, SAMPLING["top_k"], 0.0))
    mx.random.seed(0)
    counts = {}
    for _ in range(RUNS):
        steps = list(speculative_generate_step(mx.array(PROMPT), model, drafter, max_tokens=2, **SAMPLING))
        tokens = tuple(step[0] for step in steps)
        counts[tokens] = counts.get(tokens, 0) + 1
    assert total_variation(counts, exact) < TV_BOUND


def test_the_drafters_weights_are_checked_once_a_generation_not_at_every_draft(pair, monkeypatch):
    from mlx_gemma4.decode_step import CompiledSteps

    model, processor, drafter, _ = pair
    checked = []
    check = CompiledSteps.drop_if_stale
    monkeypatch.setattr(CompiledSteps, "drop_if_stale",
                        lambda steps, module: (checked.append(module is drafter), check(steps, module))[1])
    _, _, statistics = speculative_tokens(model, processor, drafter, num_draft_tokens=3)
    assert statistics.drafted >= 6 and checked.count(True) == 1


def test_a_drafter_whose_weights_were_replaced_traces_its_step_again(pair):
    _, _, drafter, _ = pair
    drafter.compiled_step()
    traced = drafter.compiled_steps.functions["draft"]
    drafter.compiled_step()
    assert drafter.compiled_steps.functions["draft"] is traced  # same weights: the trace is kept
    weight = drafter.pre_projection.weight
    drafter.pre_projection.update({"weight": weight * 1.0})  # another array, as Module.update and load_weights make
    try:
        drafter.compiled_step()
        assert drafter.compiled_steps.functions["draft"] is not traced
    finally:
        drafter.pre_projection.update({"weight": weight})


def test_window_ring_hands_out_the_window_after_appends_wraps_and_trims():
    window, slots = 4, 9
    cache = WindowCache(window, slots)
    positions = []  # the position each held key was written for
    rng = np.random.default_rng(0)
    for _ in range(60):
        length = int(rng.integers(1, 6))
        new = [len(positions) + i for i in range(length)]
        positions += new
        keys = mx.array(new, dtype=mx.float32).reshape(1, 1, length, 1)
        got, _ = cache.update_and_fetch(keys, keys)
        assert np.array(got).ravel().tolist() == positions[-(window - 1 + length):]
        rejected = int(rng.integers(0, length))
        cache.trim(rejected)
        del positions[len(positions) - rejected:]
        held, _ = cache.keys_and_values()
        assert np.array(held).ravel().tolist()[-(window + 1):] == positions[-(window + 1):]
        assert cache.offset == len(positions)


def test_the_cli_refuses_a_mismatched_assistant_in_one_line(target_folder, tmp_path, capsys):
    from mlx_gemma4.cli import main

    target, assistant = target_folder, tmp_path / "assistant"
    save_reference_assistant(assistant, backbone=40)
    capsys.readouterr()  # the fixture writers' progress bars
    assert main(["--model", str(target), "--prompt", "hi", "--draft-model", str(assistant)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: the draft model expects a target of hidden size 40") and error.count("\n") == 1


def test_the_loop_queues_each_round_before_reading_the_one_before(pair, monkeypatch):
    """With rounds of drafts and rejections, every verify pass but the first is queued on the round before's
    results still on the device (a rollback array), and the output is still plain greedy's."""
    import mlx_gemma4.speculative as speculative

    model, _, drafter, plain = pair
    rollbacks, make_step = [], speculative.decode_step

    def recording_decode_step(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def recorded(token_ids, rollback=None):
            rollbacks.append(rollback)
            return step(token_ids, rollback)
        return recorded

    monkeypatch.setattr(speculative, "decode_step", recording_decode_step)
    vocab = model.config.text_config.vocab_size
    # Right but for every third token of the plain continuation: rounds keep some drafts and reject others.
    mixed = ScriptedDrafter(drafter, PROMPT + [t if i % 3 else (t + 1) % vocab for i, t in enumerate(plain)])
    statistics = DraftStatistics()
    tokens = [token for token, *_ in speculative_generate_step(mx.array(PROMPT), model, mixed, max_tokens=GENERATED,
                                                               num_draft_tokens=3, statistics=statistics)]
    assert tokens == plain
    assert 0 < statistics.accepted < statistics.drafted  # drafts were kept and rejected
    # Only the passes near max_tokens, where a round could give more tokens than are wanted, wait to be read.
    assert sum(rollback is not None for rollback in rollbacks) >= len(rollbacks) - 3
