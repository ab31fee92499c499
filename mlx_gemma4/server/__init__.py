"""An OpenAI-compatible HTTP server: `python -m mlx_gemma4.server --model PATH_OR_ID`."""
