"""Gemma 4 12B (unified, encoder-free) on MLX."""

from .drafter import load_drafter
from .errors import Gemma4Error
from .generation import GenerationResponse, generate, stream_generate
from .loading import load

__all__ = ["Gemma4Error", "GenerationResponse", "generate", "load", "load_drafter", "stream_generate"]
