"""The JSON files beside the weights (config, generation and processor settings, the shard index), read with
one-line errors a user can act on."""

import json
from pathlib import Path

from .errors import Gemma4Error


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise Gemma4Error(f"missing {path.name} in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Gemma4Error(f"corrupt {path}: {error}") from None


def read_optional_json(path: Path) -> dict:
    """The settings in `path`, or none when the checkpoint does not ship that file."""
    return read_json(path) if path.exists() else {}
