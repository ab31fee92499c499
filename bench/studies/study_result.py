"""A study's result file: its rows with the command that made them, the device and MLX's version."""

import json
import sys
from pathlib import Path

import mlx.core as mx


def write_study_result(path: str, script: str, argv, rows: list, **fields):
    """`script` the study's file name; `argv` its arguments (None: this process's)."""
    arguments = sys.argv[1:] if argv is None else argv
    Path(path).write_text(json.dumps({
        "command": f"python bench/studies/{script} " + " ".join(arguments),
        "device": str(mx.default_device()), "mlx": mx.__version__, **fields, "rows": rows}, indent=1))
