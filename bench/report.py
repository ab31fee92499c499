"""Benchmark results as markdown tables (stdout) and JSON (written to a temp file, then renamed)."""

import json
import os
from pathlib import Path
from typing import Optional

GB = 1e9


def write_json(results: dict, path: Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=2, default=str))
    os.replace(temporary, path)


def number(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def spread(row: dict, key: str, digits: int = 1) -> str:
    low, high = row.get(key + "_min"), row.get(key + "_max")
    if low is None or row.get("repeats", 1) < 2:
        return number(row.get(key), digits)
    return f"{number(row[key], digits)} ({number(low, digits)}-{number(high, digits)})"


def ratio_against_best_peer(rows: list, key: str = "decode_tps") -> dict:
    """runtime -> our figure over the best peer's, per configuration; ours only (peers get '-')."""
    best = {}
    for row in rows:
        if row["runtime"] != "ours" and row.get(key):
            best[row["config"]] = max(best.get(row["config"], 0.0), row[key])
    return {row["config"]: row[key] / best[row["config"]] for row in rows
            if row["runtime"] == "ours" and row["config"] in best and row.get(key)}


def generation_table(rows: list) -> str:
    ratios = ratio_against_best_peer(rows)
    lines = [
        "| config | runtime | prefill tok/s | decode tok/s | TTFT ms | peak MLX GB | RSS GB | KV cache MB "
        "| roofline | decode vs best peer | greedy tokens agreeing with ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ttft = {k: v * 1000 for k, v in row.items() if k.startswith("time_to_first_token_s") and v is not None}
        ttft_row = {"time_to_first_token_ms" + k[len("time_to_first_token_s"):]: v for k, v in ttft.items()}
        ratio = ratios.get(row["config"]) if row["runtime"] == "ours" else None
        lines.append(
            f"| {row['config']} | {row['runtime']} | {spread(row, 'prefill_tps', 0)} | {spread(row, 'decode_tps')} "
            f"| {spread(dict(ttft_row, repeats=row.get('repeats', 1)), 'time_to_first_token_ms')} "
            f"| {number(row.get('peak_memory_bytes', 0) / GB, 2)} | {number(row.get('process_rss_bytes', 0) / GB, 2)} "
            f"| {number(row.get('kv_cache_bytes', 0) / 1e6, 1)} | {percent(row.get('roofline_fraction'))} "
            f"| {times(ratio)} "
            f"| {row.get('tokens_agreeing_with_ours', '-')} of {row.get('generated_tokens', '-')} |"
        )
    return "\n".join(lines)


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def long_context_table(rows: list) -> str:
    lines = ["| depth | runtime | KV | prefill s | prefill tok/s | decode tok/s at depth | peak MLX GB | KV cache MB "
             "| transient GB (until the first token / after) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        kv = f"{row['kv_bits']}-bit" if row.get("kv_bits") else "full"
        if "skipped" in row:
            lines.append(f"| {row['depth']:,} | {row['runtime']} | {kv} | skipped: {row['skipped']} | | | | | |")
            continue
        transient = row.get("transient_bytes")
        split = [row.get(f"transient_{part}_first_token_bytes") for part in ("until", "after")]
        split_cell = "" if None in split else f" ({number(split[0] / GB, 2)} / {number(split[1] / GB, 2)})"
        lines.append(
            f"| {row['depth']:,} | {row['runtime']} | {kv} | {number(row['time_to_first_token_s'], 1)} "
            f"| {number(row['prefill_tps'], 0)} | {number(row['decode_tps'])} "
            f"| {number(row['peak_memory_bytes'] / GB, 2)} | {number(row['kv_cache_bytes'] / 1e6, 0)} "
            f"| {number(None if transient is None else transient / GB, 2)}{split_cell} |"
        )
    return "\n".join(lines)


def cost_model_table(cost: dict) -> str:
    lines = ["| tokens in one target pass | 1 | " + " | ".join(str(k) for k in cost["target_pass_tokens"][1:]) + " |",
             "|---|" + "---|" * len(cost["target_pass_tokens"]),
             "| cost relative to 1 token | " + " | ".join(f"{c:.2f}" for c in cost["relative_target_cost"]) + " |"]
    text = "\n".join(lines)
    draft = cost.get("relative_draft_cost")
    text += "\n\nOne assistant step costs " + (
        f"{draft:.3f} of a one-token target pass ({cost.get('draft_cost_source', 'measured')})." if draft is not None
        else "(not measured: no drafter)."
    )
    text += "\n\n| acceptance | best K | implied speedup |" + "\n|---|---|---|"
    for entry in cost["implied_speedup"]:
        text += f"\n| {entry['acceptance']:.1f} | {entry['draft_tokens']} | {entry['speedup']:.2f}x |"
    return text


def ours_against_peer_mtp(rows: list) -> dict:
    """id(our row) -> our MTP decode speed over mlx-vlm's MTP at the same configuration and requested K."""
    peer = {(row["config"], row.get("num_draft_tokens")): row["decode_tps"] for row in rows
            if row["runtime"].startswith("mlx-vlm") and row.get("decode_tps")}
    return {id(row): row["decode_tps"] / peer[row["config"], row.get("num_draft_tokens")] for row in rows
            if row["runtime"].startswith("ours") and (row["config"], row.get("num_draft_tokens")) in peer}


def mtp_table(rows: list) -> str:
    ratios = ours_against_peer_mtp(rows)
    lines = ["Speedup: over the same runtime's plain decode in this run. Greedy tokens: compared with our plain decode.",
             "",
             "| config | runtime | draft | decode tok/s | plain decode tok/s | speedup | acceptance | drafts per pass "
             "| tokens per target pass | ours vs mlx-vlm MTP | greedy tokens agreeing with ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = ratios.get(id(row))
        lines.append(
            f"| {row['config']} | {row['runtime']} | {row['draft']} | {spread(row, 'decode_tps')} "
            f"| {number(row.get('plain_decode_tps'))} | {times(row.get('speedup'))} "
            f"| {percent(row.get('acceptance_rate'))} | {number(row.get('draft_tokens_per_pass'), 2)} "
            f"| {number(row.get('tokens_per_target_pass'), 2)} | {times(ratio)} "
            f"| {row.get('tokens_agreeing_with_ours', '-')} of {row.get('generated_tokens', '-')} |"
        )
    return "\n".join(lines)


def times(ratio: Optional[float]) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def markdown(results: dict) -> str:
    machine = results["machine"]
    parts = [f"## {results['model']} ({results['precision']}) on {machine['name']}"
             f" - bandwidth {number(machine['bandwidth_gbps'], 0)} GB/s ({machine['source']})",
             f"weights read per decoded token: {results['weight_bytes_per_token'] / GB:.3f} GB; "
             f"command: `{results['command']}`"]
    if results.get("notes"):
        parts.append("\n".join(f"- {note}" for note in results["notes"]))
    if results.get("generation"):
        parts += ["### Generation", generation_table(results["generation"])]
    if results.get("multimodal"):
        parts += ["### Multimodal time to first token", generation_table(results["multimodal"])]
    if results.get("mtp"):
        parts += ["### MTP speculative decoding", mtp_table(results["mtp"])]
    if results.get("cost_model"):
        parts += ["### MTP cost model", cost_model_table(results["cost_model"])]
    if results.get("long_context"):
        parts += ["### Long context", long_context_table(results["long_context"])]
    return "\n\n".join(parts)
