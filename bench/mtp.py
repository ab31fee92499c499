"""MTP speculative decoding in the benchmark: the measured run, and the cost model that predicts it.

Cost model: after a prefill, time one target pass over 1..9 new tokens (a verify pass of K drafts covers K + 1) and
one assistant step, each relative to a one-token target pass, each as the speculative loop runs it (the compiled
decoding step, the compiled draft step over the target's buffers). With acceptance a per draft token (independent), a
round of K drafts emits (1 - a^(K+1)) / (1 - a) tokens for K assistant steps and one (K + 1)-token target pass, so
the speedup over plain decoding is that count divided by K * draft + target(K + 1).
"""

import statistics as stats
import time

import mlx.core as mx

from peers import PREFILL_STEP_SIZE, Runtime

MAX_VERIFY_TOKENS = 9
ACCEPTANCE_RATES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TIMED_CALLS = 15


def speculative_runtime(model, drafter, num_draft_tokens=None, statistics=None) -> Runtime:
    from mlx_gemma4.draft_policy import MAX_DRAFT_TOKENS
    from mlx_gemma4.speculative import speculative_generate_step

    def steps(prompt: list, max_tokens: int, cache: list):
        return speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=max_tokens,
                                         num_draft_tokens=num_draft_tokens, prefill_step_size=PREFILL_STEP_SIZE,
                                         prompt_cache=cache, statistics=statistics)

    label = "adaptive K" if num_draft_tokens is None else f"K={num_draft_tokens}"
    longest = (MAX_DRAFT_TOKENS if num_draft_tokens is None else num_draft_tokens) + 1
    return Runtime(f"ours + MTP ({label})", model, steps, model.make_cache,
                   lambda prompt: run_every_pass_length(model, prompt, longest))


def run_every_pass_length(model, prompt: list, longest: int):
    """Runs a target pass of every length from 1 to `longest` tokens after `prompt`, so that each is traced, and on
    CUDA its kernels compiled, before the timed runs. An untimed run reaches only the lengths it happened to meet:
    the adaptive policy's tries, and with a fixed K the shorter passes that end a generation (K shrinks to the tokens
    still wanted), which depend on where the accepted drafts fell. A new length met in a timed repeat costs a trace
    (seconds where its kernels compile too): the adaptive repeats at 4.7-8.3 tok/s in
    bench/results/h200-12b-4bit-decode-512-*.json."""
    from mlx_gemma4.decode_step import decode_step

    cache = prefilled_cache(model, prompt)
    step = decode_step(model, cache, return_hidden=True)  # as the speculative loop makes it
    tokens = mx.array((prompt * longest)[:longest])[None]
    for count in range(1, longest + 1):
        target_pass(step, cache, tokens, count)()


def prefilled_cache(model, prompt: list) -> list:
    cache = model.make_cache()
    for start in range(0, len(prompt), PREFILL_STEP_SIZE):
        model(mx.array(prompt[start:start + PREFILL_STEP_SIZE])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def target_pass(step, cache: list, tokens: mx.array, count: int):
    """A call running `step` over the first `count` of `tokens` and taking them back out of `cache`."""
    def call():
        outputs = step(tokens[:, :count])
        mx.eval(outputs)
        for layer_cache in cache:
            layer_cache.trim(count)
        return outputs
    return call


def median_seconds(call) -> float:
    call()  # warm-up: compiles this shape
    times = []
    for _ in range(TIMED_CALLS):
        start = time.perf_counter()
        mx.eval(call())
        times.append(time.perf_counter() - start)
    return stats.median(times)


def cost_model(model, drafter, prompt: list) -> dict:
    """Relative costs at the depth of `prompt`, and the speedups they imply per acceptance rate."""
    from mlx_gemma4.decode_step import decode_step
    from mlx_gemma4.speculative import assistant_view, store_caches

    cache = prefilled_cache(model, prompt)
    tokens = mx.array(prompt[:MAX_VERIFY_TOKENS])[None]
    step = decode_step(model, cache)
    target = [median_seconds(target_pass(step, cache, tokens, k)) for k in range(1, MAX_VERIFY_TOKENS + 1)]
    result = {"depth": len(prompt), "target_pass_tokens": list(range(1, MAX_VERIFY_TOKENS + 1)),
              "target_pass_seconds": target, "relative_target_cost": [t / target[0] for t in target]}
    draft = None
    if drafter is not None:
        hidden_size = model.config.text_config.hidden_size
        position = mx.array([len(prompt)])
        buffers, masks = assistant_view(store_caches(model, cache), position)
        embedding = model.language_model.model.embed(tokens[:, :1])
        state = mx.zeros((1, 1, hidden_size), dtype=embedding.dtype)
        draft_step = drafter.compiled_step()  # as the speculative loop makes it, once
        draft_seconds = median_seconds(lambda: draft_step(embedding, state, buffers, position, masks)[0])
        draft = draft_seconds / target[0]
        result.update(draft_step_seconds=draft_seconds, relative_draft_cost=draft)
    result["implied_speedup"] = implied_speedups(result["relative_target_cost"], draft or 0.0)
    if drafter is None:
        result["draft_cost_source"] = "no drafter: assistant steps counted as free, an upper bound"
    return result


def expected_tokens(acceptance: float, drafts: int) -> float:
    return (1 - acceptance ** (drafts + 1)) / (1 - acceptance)


def implied_speedups(relative_target_cost: list, relative_draft_cost: float) -> list:
    """Per acceptance rate, the draft length K (1..8) with the best predicted speedup, and that speedup."""
    rows = []
    for acceptance in ACCEPTANCE_RATES:
        options = [
            (expected_tokens(acceptance, k) / (k * relative_draft_cost + relative_target_cost[k]), k)
            for k in range(1, len(relative_target_cost))
        ]
        speedup, best = max(options)
        rows.append({"acceptance": acceptance, "draft_tokens": best, "speedup": speedup})
    return rows


def predicted_speedup(cost: dict, acceptance: float, draft_tokens: int) -> float:
    target = cost["relative_target_cost"]
    k = min(draft_tokens, len(target) - 1)
    return expected_tokens(min(acceptance, 0.999), k) / (k * cost.get("relative_draft_cost", 0.0) + target[k])
