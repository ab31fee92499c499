"""Errors a user can cause. The commands print their message as one line and exit non-zero."""

import sys
from typing import Callable


class Gemma4Error(Exception):
    """Bad input: a missing or corrupt file, a wrong model type, a prompt past the context, a bad flag."""


def command_exit_code(run: Callable, args) -> int:
    """Runs a command's `run(args)`: our error is one stderr line and exit 1, Ctrl-C exit 130, and a reader that
    closed the pipe (`| head`) a quiet 0."""
    try:
        run(args)
    except Gemma4Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0
