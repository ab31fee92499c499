"""Speculative decoding with the Gemma 4 assistant drafter (multi-token prediction).

Each round: the drafter proposes k tokens from the target's last hidden state and stored keys and values (no cache of
its own), the target verifies all k + 1 positions in one pass, the longest agreeing prefix is kept plus the target's
own next token, and the target's caches are trimmed by exactly the rejected tokens. Greedy decoding keeps a draft
token when it is the target's argmax; sampling uses the standard rejection rule (keep with probability
min(1, p / q), else draw from max(0, p - q)), both distributions filtered as the plain sampler filters, so the output
is distributed as plain sampling from the target.

Sliding-window layers keep their keys in a ring (kv_cache.WindowCache) a little longer than the window (every cache
model.make_cache() makes): a rollback moves the offset back, and the extra slots still hold what the window and the
drafter (which reads one key more than the window) need. A plain round (k = 0) is plain generation's compiled decode
step, and a verify pass of k + 1 tokens is one too (decode_step.py traces one function for each k + 1): on the GPU
its logits are bit for bit those of plain steps, so greedy speculative decoding emits plain greedy decoding's tokens.

Rounds are queued one ahead, as plain decoding queues its steps: the next round is built on the current one's
results while they are still on the device (its first token, hidden state and number of rejected positions:
Round.next_inputs), so the device does not wait while the host reads a round and builds the next. Until a round is
read, the caches' offsets count its rejected positions too, and the round after it takes their number as an array
(decode_step's `rollback`). A round waits to be read first near max_tokens, while a quantization of the caches is
due, and when the two rounds could write more positions past a token handed out than the rings keep (room_ahead).

As in plain decoding, whenever a token is handed out the caches hold exactly the prompt and the tokens handed out so
far: the round that feeds a round's last token is queued before that token is yielded, and while the caller holds a
token the positions written past it (drafts still being verified) are trimmed away, and restored when it asks for
the next one. However the caller stops, `prompt_cache` is ready for the next turn.
"""

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

from .draft_policy import MAX_DRAFT_TOKENS, DraftPolicy
from .errors import Gemma4Error
from .decode_step import decode_step, full_mask, sliding_mask
from .decoding import (
    CLEAR_CACHE_EVERY, DEFAULT_PREFILL_STEP_SIZE, generation_stream, prefill, quantize_caches, sample_last)
from .kv_cache import FullCache, WindowCache, row_count


def store_caches(model, cache: list) -> dict:
    """{layer kind: cache of the target's last layer of that kind that owns one}: the reference's "store" layers,
    whose keys and values the assistant reads."""
    kinds = model.language_model.model.config.layer_types
    return {kinds[layer]: layer_cache for layer, layer_cache in zip(model.language_model.model.cached_layers, cache)}


class LastHiddenRecorder:
    """The target as generate_step calls it during prefill, keeping the final-normed hidden state of the last
    position: the drafter's first input. Everything else is the target's own."""

    def __init__(self, model):
        self.model = model
        self.last_hidden = None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        logits, hidden = self.model(*args, return_hidden=True, **kwargs)
        self.last_hidden = hidden[:, -1:]
        return logits


def make_filter(temp: float, top_p: float, top_k: int, min_p: float):
    """Logits to the log-probabilities a sampler draws from: mlx-lm's filters in make_sampler's order, then the
    temperature. The same filter is applied to target and drafter."""
    filters = []
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, min_p))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))

    def sampling_logprobs(logits: mx.array) -> mx.array:
        # The acceptance test divides these probabilities: keep them in float32 whatever the weights' dtype.
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for apply in filters:
            logprobs = apply(logprobs)
        scaled = logprobs / temp
        return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)

    return sampling_logprobs


def accept_greedy(target_logits: mx.array, drafts: mx.array, draft_logprobs):
    """(accepted per draft, the target's token at every position)."""
    target_tokens = mx.argmax(target_logits, axis=-1)
    return drafts == target_tokens[:-1], target_tokens


def make_rejection_rule(sampling_logprobs):
    def accept_sampled(target_logits: mx.array, drafts: mx.array, draft_logprobs: mx.array):
        """(accepted per draft, the token to emit at every position if it is the first rejected one (a draw from
        max(0, p - q)) or the bonus position (a draw from p))."""
        target = mx.exp(sampling_logprobs(target_logits))
        draft = mx.exp(draft_logprobs)
        k = drafts.shape[0]
        p_draft = mx.take_along_axis(target[:k], drafts[:, None], axis=-1)[:, 0]
        q_draft = mx.take_along_axis(draft, drafts[:, None], axis=-1)[:, 0]
        accepted = mx.random.uniform(shape=(k,)) * q_draft < p_draft
        residual = mx.log(mx.maximum(target[:k] - draft, 0.0))
        fallback = mx.random.categorical(mx.concatenate([residual, mx.log(target[k:])], axis=0))
        return accepted, fallback

    return accept_sampled


@dataclass
class DraftStatistics:
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens emitted
    target_passes: int = 0  # verify passes (the prefill not counted)
    emitted: int = 0  # tokens emitted by verify passes
    # {K: wall seconds of each round of K drafts (0: a plain step)}, from the results of the round before being read
    # to this round's: drafts, verify pass and the loop's own work together. With the next round queued before a
    # round is read, the interval holds the building of that next round, so it is a length's cost where the rounds
    # around it have that length too.
    round_seconds: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def accepted_per_pass(self) -> float:
        return self.accepted / self.target_passes if self.target_passes else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / self.target_passes if self.target_passes else 0.0


@dataclass
class Round:
    """One draft-and-verify pass, queued: its k drafts, which of them the target accepts, the target's own token
    at each of the k + 1 positions (used at the first rejection, or after all k), and the target's log-probabilities
    and final-normed hidden states there."""

    k: int
    drafts: mx.array
    accepted: mx.array
    fallback: mx.array
    logprobs: mx.array
    hidden: mx.array

    def next_inputs(self, kept: Optional[int]) -> tuple:
        """(token (1, 1), hidden state (1, 1, hidden), rollback) for the round after this one, which starts at the
        target's own token after the `kept` accepted drafts. With `kept` unknown (None: this round not yet read) all
        three are computed on the device from `accepted`, so that the next round can be queued before this one has
        run; `rollback` is then how many of this round's k positions are rejected, a (1,) array the caches' offsets
        still count (None when known to be 0)."""
        if kept is None and self.k:
            count = mx.cumprod(self.accepted.astype(mx.int32)).sum(keepdims=True)
            token = mx.take(self.fallback, count).reshape(1, 1)
            return token, mx.take(self.hidden, count, axis=1), self.k - count
        kept = kept or 0
        return self.fallback.reshape(1, -1)[:, kept : kept + 1], self.hidden[:, kept : kept + 1], None


def assistant_view(stores: dict, position: mx.array) -> tuple:
    """(buffers, masks) for a draft step at `position` ((1,)): the store layers' whole buffers and, for each kind, the
    rows the assistant sees: every position before `position` (full), the window + 1 latest of them (sliding: slot j
    of a ring holds the latest position congruent to j)."""
    buffers, masks = {}, {}
    for kind, layer_cache in stores.items():
        buffers[kind] = (layer_cache.keys, layer_cache.values)
        rows = row_count(layer_cache.keys)
        if isinstance(layer_cache, WindowCache):
            masks[kind] = sliding_mask(position - 1, rows, layer_cache.window + 1)
        else:
            masks[kind] = full_mask(position - 1, rows)
    return buffers, masks


def draft(draft_step, embed, token: mx.array, hidden: mx.array, stores: dict, position: mx.array, k: int,
          sampling_logprobs):
    """k tokens chained from one position ((1,), an array, so that it may still be computed on the device): each
    step feeds the drafter (`draft_step`: its compiled_step(), or the drafter itself) its own projected state and the
    target's embedding of the token it just proposed, and gets the same `position` array. Returns the tokens (each
    (1, 1)) and, when sampling, their distributions."""
    buffers, masks = assistant_view(stores, position)
    current, state, tokens, distributions = token, hidden, [], []
    for _ in range(k):
        logits, state = draft_step(embed(current), state, buffers, position, masks)
        if sampling_logprobs is None:
            current = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
        else:
            distributions.append(sampling_logprobs(logits[:, -1]))
            current = mx.random.categorical(distributions[-1])[:, None]
        tokens.append(current)
    return tokens, distributions


def room_ahead(cache: list) -> int:
    """How many positions the caches can hold written past the last token handed out, so that they still hold
    what the next turn needs if the caller stops there (the rings' spare slots but the one the assistant reads);
    0 while a quantization is still due, since it happens at an offset, which must then not count drafts that may
    yet be rejected."""
    if any(c.quantization is not None and not c.quantized for c in cache):
        return 0
    return min((c.slots - c.window - 1 for c in cache if isinstance(c, WindowCache)), default=MAX_DRAFT_TOKENS * 2)


def handed_out(cache: list, steps: list, ahead: list) -> Iterator[tuple]:
    """Yields each of `steps` while the caches hide the `ahead[i]` positions already written past it, so that they
    hold exactly what was handed out; the hidden positions come back when the caller asks for the next one."""
    for step, hidden_positions in zip(steps, ahead):
        for layer_cache in cache:
            layer_cache.trim(hidden_positions)
        yield step
        for layer_cache in cache:
            layer_cache.advance(hidden_positions)


def speculative_generate_step(
    prompt: mx.array,
    model,
    drafter,
    *,
    max_tokens: int,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    num_draft_tokens: Optional[int] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_cache: Optional[list] = None,
    statistics: Optional[DraftStatistics] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    **model_inputs,
) -> Iterator[tuple]:
    """Yields (token, logprobs, from_draft) for `prompt`; the prefill (media included) is generate_step's own.
    `num_draft_tokens` fixes K; None lets draft_policy.DraftPolicy pick it from measured acceptance and round
    times."""
    policy = drafter.draft_policy if num_draft_tokens is None else DraftPolicy(num_draft_tokens)
    policy.begin()
    statistics = statistics if statistics is not None else DraftStatistics()
    cache = model.make_cache() if prompt_cache is None else prompt_cache
    if not all(isinstance(c, (FullCache, WindowCache)) and c.is_trimmable() for c in cache):
        raise Gemma4Error("speculative decoding needs trimmable caches: make them with model.make_cache()")
    quantize_caches(cache, kv_bits, kv_group_size, quantized_kv_start)
    stores = store_caches(model, cache)
    embed = model.language_model.model.embed
    sampling_logprobs = None if temp == 0 else make_filter(temp, top_p, top_k, min_p)
    accept = accept_greedy if temp == 0 else make_rejection_rule(sampling_logprobs)

    sampler = make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
    no_tokens = mx.zeros((0,), dtype=mx.int32)

    def plain_round(token: mx.array, rollback) -> Round:
        """A plain decoding step (k = 0) after `token`, as generate_step runs one: the target's compiled step alone,
        its token drawn by the plain sampler, nothing else queued."""
        logits, hidden = target_step(token, rollback)
        step = Round(0, no_tokens, no_tokens, *sample_last(logits, sampler), hidden)
        mx.async_eval(step.fallback, step.logprobs, step.hidden)
        return step

    def start_round(previous: Round, k: int, kept: Optional[int]) -> Round:
        """Draft k tokens after the target's own token that ends `previous` (after its `kept` accepted drafts; None:
        not read yet, see Round.next_inputs) and verify them in one target pass; all queued, nothing waited for.
        Every array of the round is made on the generation stream: a slice made on another stream would be a second
        stream the round waits for, and MLX fences two streams within one evaluation by waiting on the host (its
        CUDA backend: for the GPU to reach the fence, in the middle of handing the round over)."""
        with mx.stream(generation_stream):
            token, state, rollback = previous.next_inputs(kept)
            if k == 0:
                return plain_round(token, rollback)
            # The caches' offset counts every position written so far, `rollback` the ones `previous` rejected.
            position = mx.array([cache[0].offset]) if rollback is None else cache[0].offset - rollback
            drafts, distributions = draft(draft_step, embed, token, state, stores, position, k, sampling_logprobs)
            mx.async_eval(drafts)  # the assistant runs while the verify pass is being built
            verify_ids = mx.concatenate([token] + drafts, axis=1)
            logits, hidden = target_step(verify_ids, rollback)
            logits = logits[0]
            distributions = mx.concatenate(distributions) if distributions else None
            accepted, fallback = accept(logits, verify_ids[0, 1:], distributions)
            step = Round(k, verify_ids[0, 1:], accepted, fallback,
                         logits - mx.logsumexp(logits, axis=-1, keepdims=True), hidden)
        mx.async_eval(step.drafts, step.accepted, step.fallback, step.logprobs, step.hidden)
        return step

    def queued_before_reading(current: Round, produced: int) -> Optional[Round]:
        """The round after `current`, queued on its results still on the device, when tokens are wanted past all that
        `current` can give and the caches can hold both rounds' positions past a token handed out; else None. The
        device then never idles while the host reads a round and builds the next."""
        wanted_after = max_tokens - produced - current.k - 1
        if wanted_after <= 0:
            return None
        k = policy.next(wanted_after)
        if current.k + k > room_ahead(cache):
            return None
        return start_round(current, k, kept=None)

    recorder = LastHiddenRecorder(model)
    first, first_logprobs = prefill(prompt, recorder, cache, sampler, prefill_step_size, **model_inputs)
    target_step = decode_step(model, cache, return_hidden=True)  # plain steps and verify passes, compiled
    draft_step = drafter.compiled_step()  # its weights checked once, here
    prefilled = Round(0, no_tokens, no_tokens, first, first_logprobs, recorder.last_hidden)
    current = start_round(prefilled, policy.next(max_tokens - 1), kept=0)
    yield from handed_out(cache, [(first.item(), first_logprobs, False)], [current.k])
    produced, next_clear = 1, CLEAR_CACHE_EVERY
    clock = time.perf_counter()
    while produced < max_tokens:
        # `current` is queued, and its first input, the last token handed out, is in the caches.
        queued = queued_before_reading(current, produced)
        # Keep the drafts up to the first rejected one, then the target's own token there. (The list is indexed, not
        # the array: `fallback[count].item()` would build and evaluate one more array every round.)
        count = (current.accepted.tolist() + [False]).index(False)
        tokens = (current.drafts.tolist()[:count] + [current.fallback.tolist()[count]])[: max_tokens - produced]
        now = time.perf_counter()
        round_time, clock = now - clock, now
        # With the next round queued before this one was read, the time since the last read holds the host's
        # building of that next round: it tells this round's length's cost only when the next has the same length.
        policy.record(current.k, count, round_time if queued is None or queued.k == current.k else None)
        statistics.round_seconds.setdefault(current.k, []).append(round_time)
        # Roll back exactly the rejected drafts: the caches then end at the last kept draft, or at the queued
        # round's last position, which its pass wrote where the rollback put it.
        for layer_cache in cache:
            layer_cache.trim(current.k - count)
        statistics.drafted += current.k
        statistics.target_passes += 1
        kept_drafts = min(count, len(tokens))
        statistics.emitted += len(tokens)
        statistics.accepted += kept_drafts
        with mx.stream(generation_stream):
            steps = [(token, current.logprobs[index], index < count) for index, token in enumerate(tokens)]
        if queued is not None:
            # Past each token: the kept drafts after it, then the queued round's k + 1 positions (its first is the
            # target's own token, the last handed out here).
            yield from handed_out(cache, steps, [count - index + queued.k for index in range(len(steps))])
            produced += len(steps)
        else:
            # The kept drafts are in the caches already, each with the later kept drafts behind it.
            yield from handed_out(cache, steps[:kept_drafts], [count - index - 1 for index in range(kept_drafts)])
            produced += kept_drafts
            if kept_drafts == len(tokens):  # max_tokens ends on a kept draft: only the drafts after it are dropped
                for layer_cache in cache:
                    layer_cache.trim(count - kept_drafts)
                return
            # The target's own token (tokens[-1], its fallback at `count`): the next round feeds it (a plain step
            # when nothing more is wanted) and is queued before the token is handed out, to run while the caller
            # works.
            queued = start_round(current, policy.next(max_tokens - produced - 1), kept=count)
            yield from handed_out(cache, steps[-1:], [queued.k])
            produced += 1
        if produced >= next_clear:
            mx.clear_cache()
            next_clear += CLEAR_CACHE_EVERY
        current = queued


def speculative_steps(prompt: mx.array, model, drafter, *, sampler=None, **options) -> Iterator[tuple]:
    """speculative_generate_step for stream_generate: checks the pair and the options before anything runs."""
    from .drafter import check_compatible

    if sampler is not None:
        raise Gemma4Error("speculative decoding samples with temp/top_p/top_k/min_p; a custom sampler cannot be used")
    check_compatible(drafter, model)
    DraftPolicy(options.get("num_draft_tokens"))
    return speculative_generate_step(prompt, model, drafter, **options)
