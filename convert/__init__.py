"""Hugging Face Gemma 4 unified checkpoints to MLX folders: `python convert/convert.py --help`."""
