"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class Gemma4Error(Exception):
    """Bad input: a missing or corrupt file, a wrong model type, a prompt past the context, a bad flag."""
