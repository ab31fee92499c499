"""MTP speculative decoding rows: ours and mlx-vlm's, on the same target and assistant weights.

mlx-vlm reads the assistant from disk, so the drafter in play (random, or loaded with --draft-model) is written next
to the target's converted weights, in the same converted layout with every config field written out (mlx-vlm's
config reader ignores `per_layer_config`, so the full layers' head size and kv heads are spelled out as the target's
are). Speedups are against the same runtime's plain decode in this run; tokens are compared with our plain greedy ones.
mlx-lm has no MTP path: its speculative_generate_step needs a standalone draft LM, which the assistant is not.
"""

from pathlib import Path
from statistics import median

from measure import log, measure
from mlx_gemma4.json_files import read_json
from mlx_gemma4.loading import resolve_model_path

ASSISTANT_MODEL_TYPE = "gemma4_unified_assistant"
NO_MLX_LM_MTP = ("mlx-lm: no MTP rows; it has no MTP path (its speculative_generate_step needs a standalone draft LM "
                 "with the same vocabulary, and a Gemma 4 assistant reads the target's states instead)")


def draft_lengths(text: str) -> list:
    return [None if part.strip() == "adaptive" else int(part) for part in text.split(",") if part.strip()]


def assistant_source_config(args, target_config: dict) -> dict:
    if args.draft_model:
        return read_json(resolve_model_path(args.draft_model) / "config.json")
    from random_model import assistant_config_dict

    return assistant_config_dict(target_config)


def save_peer_assistant(drafter, source_config: dict, folder: Path) -> Path:
    """The assistant as mlx-vlm's load_drafter reads it: our parameter names are the checkpoint's."""
    from random_model import peer_readable_config, save_converted

    config = dict(peer_readable_config(source_config, drafter), model_type=ASSISTANT_MODEL_TYPE)
    save_converted(drafter, config, folder)
    return folder


def mtp_row(bench, runtime, config: str, figures: dict, statistics, num_draft_tokens, draft: str, plain_tps) -> dict:
    row = bench.row(runtime, config, figures)
    row.update(draft=draft, num_draft_tokens="adaptive" if num_draft_tokens is None else num_draft_tokens,
               acceptance_rate=statistics.acceptance_rate, tokens_per_target_pass=statistics.tokens_per_pass,
               draft_tokens_per_pass=statistics.drafted / statistics.target_passes if statistics.target_passes else 0.0,
               plain_decode_tps=plain_tps, speedup=row["decode_tps"] / plain_tps if plain_tps else None)
    if statistics.round_seconds:  # our loop times its rounds; mlx-vlm's (counted by peers.py) does not
        row["round_ms_by_draft_tokens"] = {
            str(k): {"rounds": len(seconds), "median_ms": 1000 * median(seconds)}
            for k, seconds in sorted(statistics.round_seconds.items())}
    return row


def run_peer_mtp(bench, args, model, folder: Path, prompts: dict):
    """mlx-vlm's MTP at every requested K ('adaptive' runs mlx-vlm's default block size, a fixed K)."""
    from peers import load_mlx_vlm_drafter, mlx_vlm_default_draft_tokens, mlx_vlm_mtp_runtime

    notes = bench.results["notes"]
    try:
        drafter = load_mlx_vlm_drafter(folder)
    except Exception as error:  # a peer that cannot read the assistant is a finding, not a crash
        notes.append(f"mlx-vlm could not load the assistant: {str(error).splitlines()[0][:160]}")
        return
    default = mlx_vlm_default_draft_tokens(drafter)
    if None in draft_lengths(args.num_draft_tokens):
        notes.append(f"mlx-vlm + MTP has no adaptive schedule of its own: its 'adaptive' rows run its default, the "
                     f"assistant's block_size ({default + 1} tokens: K={default} drafts per round); a larger K is a "
                     f"ceiling it drafts up to only while 65% of its last 32 rounds accept all {default} drafts")
    try:
        mtp_rows(bench, args, prompts, "mlx-vlm",
                 lambda k, statistics: mlx_vlm_mtp_runtime(model, drafter, k, statistics),
                 lambda k: f"mlx-vlm default K={default}" if k is None else f"K={k}")
    except Exception as error:  # as above: recorded, and the other runtimes still run
        notes.append(f"mlx-vlm + MTP failed: {str(error).splitlines()[0][:160]}")


def mtp_rows(bench, args, prompts: dict, plain_runtime: str, make_runtime, label):
    """One row per prompt and requested K: make_runtime(K or None, statistics) gives the runtime, label(K) its draft
    length's description; the speedup is over `plain_runtime`'s decode in this run."""
    from mlx_gemma4.speculative import DraftStatistics

    plain = {row["config"]: row["decode_tps"] for row in bench.results["generation"] if row["runtime"] == plain_runtime}
    draft_name = args.draft_model or "random assistant"
    for length, prompt in prompts.items():
        for k in draft_lengths(args.num_draft_tokens):
            statistics = DraftStatistics()
            runtime = make_runtime(k, statistics)
            log(f"{runtime.name}: prompt {length}")
            figures = measure(runtime, prompt, args.gen_tokens, args.repeat)
            config = f"prompt {length}"
            bench.results["mtp"].append(mtp_row(bench, runtime, config, figures, statistics, k,
                                                f"{draft_name}, {label(k)}", plain.get(config)))
            bench.save()
