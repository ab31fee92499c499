"""The runtimes a benchmark compares, each behind one small interface: ours, mlx-lm's and mlx-vlm's Gemma 4 paths.

The peers load the very folder our random (or real) weights were written to, with their own loaders, and each is
timed through its own fastest generation loop (all three queue the next step with `mx.async_eval`):
- `mlx-lm`: mlx_lm.utils.load_model + mlx_lm.generate.generate_step;
- `mlx-vlm`: mlx_vlm.utils.load_model + mlx_vlm's own generate_step (mlx_vlm.generate.ar);
- `mlx-vlm-lm`: mlx-vlm's language model driven by mlx-lm's generate_step, the fastest mlx-vlm path we know;
- `mlx-vlm + MTP`: mlx-vlm's generate_step with its Gemma 4 assistant drafter (draft_kind="mtp").
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx

PREFILL_STEP_SIZE = 2048
PEERS = ("mlx-lm", "mlx-vlm", "mlx-vlm-lm")
PEER_PACKAGES = {"mlx-lm": "mlx_lm", "mlx-vlm": "mlx_vlm", "mlx-vlm-lm": "mlx_vlm"}


@dataclass
class Runtime:
    name: str
    model: object
    # steps(prompt ids, max_tokens, cache, **options) -> iterator whose items start with the token id; options are
    # the generate_step keywords both we and mlx-lm take (kv_bits, kv_group_size, quantized_kv_start)
    steps: Callable[..., Iterator]
    make_cache: Callable[[], list]
    # warm_up(prompt ids): compiles what one untimed run may not reach (MTP's every verify pass length)
    warm_up: Optional[Callable[[list], None]] = None


def ours(model) -> Runtime:
    from mlx_gemma4.decoding import generate_step

    def steps(prompt: list, max_tokens: int, cache: list, **options):
        return generate_step(mx.array(prompt), model, max_tokens=max_tokens, prompt_cache=cache,
                             prefill_step_size=PREFILL_STEP_SIZE, **options)

    return Runtime("ours", model, steps, model.make_cache)


def peer_installed(name: str) -> bool:
    return importlib.util.find_spec(PEER_PACKAGES[name]) is not None


def load_peers(names: list, folder: Path) -> Iterator[Runtime]:
    """One runtime at a time (the caller drops each before the next loads); mlx-vlm's two paths share one load."""
    folder = Path(folder)
    if "mlx-lm" in names:
        yield mlx_lm_runtime(folder)
    if "mlx-vlm" in names or "mlx-vlm-lm" in names:
        from mlx_vlm.utils import load_model

        model = load_model(folder)
        if "mlx-vlm" in names:
            yield mlx_vlm_runtime(model)
        if "mlx-vlm-lm" in names:
            yield mlx_vlm_language_runtime(model)


def mlx_lm_runtime(folder: Path) -> Runtime:
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)

    def steps(prompt: list, max_tokens: int, cache: list, **options):
        return generate_step(mx.array(prompt), model, max_tokens=max_tokens, prompt_cache=cache,
                             prefill_step_size=PREFILL_STEP_SIZE, **options)

    return Runtime("mlx-lm", model, steps, lambda: make_prompt_cache(model))


def mlx_vlm_runtime(model) -> Runtime:
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_vlm.generate.ar import generate_step

    def steps(prompt: list, max_tokens: int, cache: list):
        return generate_step(mx.array(prompt)[None], model, None, None, max_tokens=max_tokens, temperature=0.0,
                             prompt_cache=cache, prefill_step_size=PREFILL_STEP_SIZE)

    return Runtime("mlx-vlm", model, steps, lambda: make_prompt_cache(model.language_model))


class LogitsOnly:
    """mlx-vlm's language model returns an output object; mlx-lm's loop wants the logits array."""

    def __init__(self, language_model):
        self.language_model = language_model
        self.layers = language_model.model.layers

    def __call__(self, inputs, cache=None, **kwargs):
        return self.language_model(inputs, cache=cache, **kwargs).logits

    def make_cache(self):
        return self.language_model.make_cache()


def mlx_vlm_language_runtime(model) -> Runtime:
    from mlx_lm.generate import generate_step

    language = LogitsOnly(model.language_model)

    def steps(prompt: list, max_tokens: int, cache: list):
        return generate_step(mx.array(prompt), language, max_tokens=max_tokens, prompt_cache=cache,
                             prefill_step_size=PREFILL_STEP_SIZE)

    return Runtime("mlx-vlm-lm", model, steps, language.make_cache)


def load_mlx_vlm_drafter(folder: Path):
    from mlx_vlm.speculative.drafters import load_drafter

    drafter, kind = load_drafter(str(folder), kind="mtp")
    assert kind == "mtp", f"mlx-vlm took the assistant for a {kind!r} drafter"
    return drafter


def mlx_vlm_default_draft_tokens(drafter) -> int:
    """The drafts per round mlx-vlm runs when no block size is asked for: its block counts the bonus token too."""
    from mlx_vlm.speculative.common import _dflash_block_total

    return _dflash_block_total(drafter, None) - 1


def mlx_vlm_mtp_runtime(model, drafter, num_draft_tokens, statistics) -> Runtime:
    """mlx-vlm's own MTP loop, greedy. K drafts per round is its draft_block_size K + 1; None keeps the drafter's
    configured block size (a fixed K: mlx-vlm has no adaptive schedule below it). `statistics` (a DraftStatistics)
    gets the drafter's own round counters and the tokens the verify passes emitted."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_vlm.generate.ar import generate_step
    from mlx_vlm.speculative.common import speculative_stats_since, speculative_stats_snapshot

    block_size = None if num_draft_tokens is None else num_draft_tokens + 1

    def steps(prompt: list, max_tokens: int, cache: list):
        before = speculative_stats_snapshot(drafter)
        count = 0
        for step in generate_step(mx.array(prompt)[None], model, None, None, max_tokens=max_tokens, temperature=0.0,
                                  prompt_cache=cache, prefill_step_size=PREFILL_STEP_SIZE, draft_model=drafter,
                                  draft_kind="mtp", draft_block_size=block_size):
            count += 1
            yield step
        rounds, accepted, drafted = speculative_stats_since(drafter, before)
        statistics.target_passes += rounds or 0
        statistics.accepted += accepted or 0
        statistics.drafted += drafted or 0
        statistics.emitted += max(count - 1, 0)  # the first token is the prefill's

    label = f"default K={mlx_vlm_default_draft_tokens(drafter)}" if num_draft_tokens is None else f"K={num_draft_tokens}"
    return Runtime(f"mlx-vlm + MTP ({label})", model, steps, lambda: make_prompt_cache(model.language_model))
