"""The README's memory tables come from a bench result file: peaks per depth, and the largest context each Mac size
fits, solved from a straight-line fit of peak against depth."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from memory_table import GB, GPU_SHARE, MAX_CONTEXT, largest_context, merged, readme_section  # noqa: E402


def row(runtime, kv_bits, depth, peak_gb, transient_gb=0.5):
    return {"runtime": runtime, "kv_bits": kv_bits, "depth": depth, "peak_memory_bytes": peak_gb * GB,
            "transient_bytes": transient_gb * GB}


def test_largest_context_solves_the_fitted_line_for_the_budget():
    # peak = 7 GB + 1 GB per 32K tokens
    rows = {depth: row("ours", None, depth, 7 + depth / 32_768) for depth in (8_192, 32_768, 131_072)}
    assert largest_context(rows, 9 * GB) == 65_536
    assert largest_context(rows, 100 * GB) == MAX_CONTEXT
    assert largest_context(rows, 6 * GB) == 0
    assert largest_context({8_192: rows[8_192]}, 9 * GB) is None


def test_readme_section_has_both_tables_and_names_what_did_not_run():
    results = {
        "model": "random 12b", "precision": "4-bit, group 64", "machine": {"name": "H200"}, "command": "bench",
        "long_context": [row("ours", None, 8_192, 7.5), row("ours", None, 32_768, 8.5),
                         row("ours", 8, 8_192, 7.2), row("ours", 8, 32_768, 7.8),
                         {"runtime": "mlx-lm", "kv_bits": 8, "depth": 8_192, "skipped": "failed: NYI"}],
    }
    text = readme_section(results, "h200.json")
    assert "| 32,768 | 8.5 GB (0.5 transient) | 7.8 GB (0.5 transient) |" in text
    budget = 16 * GPU_SHARE
    assert f"| 16 GB ({budget:.1f} GB) |" in text
    assert "- mlx-lm, 8-bit KV: failed: NYI" in text


def test_runs_split_over_several_files_make_one_table(tmp_path):
    base = {"model": "random 12b", "precision": "4-bit", "machine": {"name": "H200"}}
    ours = dict(base, command="bench ours", long_context=[row("ours", None, 8_192, 7.5)])
    peers = dict(base, command="bench --skip-ours", long_context=[row("mlx-lm", None, 8_192, 7.9)])
    files = []
    for name, results in (("ours", ours), ("peers", peers)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(results))
    combined = merged(files)
    assert [r["runtime"] for r in combined["long_context"]] == ["ours", "mlx-lm"]
    assert "bench ours" in combined["command"] and "bench --skip-ours" in combined["command"]


def split_row(runtime, kv_bits, depth, peak_gb, until_gb, after_gb, decode, prefill):
    return dict(row(runtime, kv_bits, depth, peak_gb), transient_until_first_token_bytes=until_gb * GB,
                transient_after_first_token_bytes=after_gb * GB, decode_tps=decode, prefill_tps=prefill)


def test_rows_split_at_the_first_token_add_a_table_of_the_split_and_the_speeds():
    base = {"model": "random 12b", "precision": "4-bit", "machine": {"name": "H200"}, "command": "bench"}
    split = dict(base, long_context=[split_row("ours", 8, 8_192, 8.48, 1.41, 0.16, 150.61, 67.2),
                                     split_row("ours", None, 8_192, 8.32, 1.03, 0.03, 125.5, 795.4),
                                     split_row("ours", None, 131_072, 11.41, 2.1, 0.7, 147.7, 3880.2)])
    text = readme_section(split, "h200.json")
    assert "| 8,192 | 8.48 GB (1.41 / 0.16) | 8.32 GB (1.03 / 0.03) | 150.6 / 125.5 | 67 / 795 |" in text
    assert "| 131,072 | - | 11.41 GB (2.10 / 0.70) | - / 147.7 | - / 3,880 |" in text
    unsplit = dict(base, long_context=[row("ours", None, 8_192, 7.5)])
    assert "Peak split" not in readme_section(unsplit, "h200.json")
