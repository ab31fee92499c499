"""The README's long-context memory tables, derived from a bench result file, never typed by hand:

    python bench/memory_table.py bench/results/h200-12b-4bit-memory.json [more result files of the same model]

"Peak memory against depth" lists each runtime's peak (and its transient part: peak - weights - KV cache) at each
measured depth and KV precision. "Largest context that fits" fits peak = a + b x depth to each runtime's measured
depths (least squares: the KV cache grows linearly, and so do the scores a runtime materializes) and solves it for
the memory macOS lets the GPU use on a Mac of each size. Where the rows split the transient at the first token, a
third table gives that split with the decode and prefill speeds at each depth.
"""

import json
import sys
from pathlib import Path
from typing import Optional

GB = 1e9
MAC_MEMORY_GB = (16, 24, 32)
# macOS lets the GPU wire about two thirds of a Mac's memory at these sizes (Metal's recommendedMaxWorkingSetSize;
# `sudo sysctl iogpu.wired_limit_mb` raises it); the rest is the system's and the apps'.
GPU_SHARE = 2 / 3
# Gemma 4's context: no fit is extrapolated past it.
MAX_CONTEXT = 262_144


def configurations(results: dict) -> dict:
    """{(runtime, kv_bits): {depth: row}} over the long-context rows that ran."""
    table = {}
    for row in results.get("long_context", []):
        if "skipped" not in row:
            table.setdefault((row["runtime"], row.get("kv_bits")), {})[row["depth"]] = row
    return table


def label(runtime: str, kv_bits: Optional[int]) -> str:
    return f"{runtime}, {kv_bits}-bit KV" if kv_bits else f"{runtime}, full-precision KV"


def failures(results: dict) -> list:
    """'runtime, KV: reason' for each configuration that never ran (e.g. a peer that cannot quantize its cache)."""
    seen = {}
    for row in results.get("long_context", []):
        if "skipped" in row:
            seen.setdefault(label(row["runtime"], row.get("kv_bits")), row["skipped"])
    ran = {label(*key) for key in configurations(results)}
    return [f"{name}: {reason}" for name, reason in seen.items() if name not in ran]


def peak_table(results: dict) -> str:
    table = configurations(results)
    depths = sorted({depth for rows in table.values() for depth in rows})
    header = "| depth | " + " | ".join(label(*key) for key in table) + " |"
    lines = [header, "|---|" + "---|" * len(table)]
    for depth in depths:
        cells = []
        for rows in table.values():
            row = rows.get(depth)
            cells.append("-" if row is None else
                         f"{row['peak_memory_bytes'] / GB:.1f} GB ({row['transient_bytes'] / GB:.1f} transient)")
        lines.append(f"| {depth:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def has_split(results: dict) -> bool:
    """Whether every row that ran records its peak split at the first token (bench.py since 43db097)."""
    rows = [row for rows in configurations(results).values() for row in rows.values()]
    return bool(rows) and all("transient_until_first_token_bytes" in row for row in rows)


def split_table(results: dict) -> str:
    """Each configuration's peak with its transient until and after the first token, and the speeds at that depth
    (decode at depth, prefill; the first depth run in a process includes compiling)."""
    table = configurations(results)
    names = [label(*key) for key in table]
    lines = ["| depth | " + " | ".join(f"{name}: peak (transient until / after the first token)" for name in names)
             + f" | decode tok/s at depth: {' / '.join(names)} | prefill tok/s: {' / '.join(names)} |",
             "|---|" + "---|" * (len(table) + 2)]
    for depth in sorted({depth for rows in table.values() for depth in rows}):
        peaks, decode, prefill = [], [], []
        for rows in table.values():
            row = rows.get(depth)
            if row is None:
                peaks.append("-"), decode.append("-"), prefill.append("-")
                continue
            peaks.append(f"{row['peak_memory_bytes'] / GB:.2f} GB ({row['transient_until_first_token_bytes'] / GB:.2f}"
                         f" / {row['transient_after_first_token_bytes'] / GB:.2f})")
            decode.append(f"{row['decode_tps']:,.1f}")
            prefill.append(f"{row['prefill_tps']:,.0f}")
        lines.append(f"| {depth:,} | " + " | ".join(peaks) + f" | {' / '.join(decode)} | {' / '.join(prefill)} |")
    return "\n".join(lines)


def largest_context(rows: dict, budget_bytes: float) -> Optional[int]:
    """The depth at which the fitted peak reaches `budget_bytes` (capped at MAX_CONTEXT; 0 when even an empty
    context would not fit), or None with fewer than two measured depths."""
    if len(rows) < 2:
        return None
    depths = list(rows)
    peaks = [rows[depth]["peak_memory_bytes"] for depth in depths]
    mean_depth, mean_peak = sum(depths) / len(depths), sum(peaks) / len(peaks)
    slope = sum((d - mean_depth) * (p - mean_peak) for d, p in zip(depths, peaks)) / sum(
        (d - mean_depth) ** 2 for d in depths)
    intercept = mean_peak - slope * mean_depth
    if intercept > budget_bytes:
        return 0
    if slope <= 0:
        return MAX_CONTEXT
    return min(MAX_CONTEXT, int((budget_bytes - intercept) / slope))


def fits_table(results: dict) -> str:
    table = configurations(results)
    lines = ["| Mac memory (GPU share) | " + " | ".join(label(*key) for key in table) + " |",
             "|---|" + "---|" * len(table)]
    for memory in MAC_MEMORY_GB:
        budget = memory * GPU_SHARE * GB
        cells = []
        for rows in table.values():
            tokens = largest_context(rows, budget)
            cells.append("-" if tokens is None else f"{tokens:,}" + (" (all)" if tokens == MAX_CONTEXT else ""))
        lines.append(f"| {memory} GB ({budget / GB:.1f} GB) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_section(results: dict, source: str) -> str:
    notes = "".join(f"\n- {line}" for line in failures(results))
    return (f"#### Peak memory against depth\n\n{results['model']} ({results['precision']}) on "
            f"{results['machine']['name']}; `{results['command']}` -> `{source}`.\n\n{peak_table(results)}\n\n"
            f"#### Largest context that fits a 16, 24 and 32 GB Mac\n\nFitted to the depths above (peak = a + b x "
            f"depth), for the {GPU_SHARE:.0%} of its memory macOS lets the GPU use; \"(all)\" is Gemma 4's whole "
            f"{MAX_CONTEXT:,}-token context.\n\n{fits_table(results)}"
            + (f"\n\n#### Peak split at the first token, and speeds at depth\n\n{split_table(results)}"
               if has_split(results) else "")
            + (f"\n\nDid not run:{notes}" if notes else ""))


def merged(files: list) -> dict:
    """One result dict from runs of the same model split over several calls (e.g. ours, then the peers)."""
    results = [json.loads(Path(file).read_text()) for file in files]
    first = dict(results[0])
    first["command"] = "`; `".join(result["command"] for result in results)
    first["long_context"] = [row for result in results for row in result.get("long_context", [])]
    return first


if __name__ == "__main__":
    print(readme_section(merged(sys.argv[1:]), "`, `".join(sys.argv[1:])))
