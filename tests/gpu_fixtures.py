"""The small model the GPU tests decode with: the 12B's head sizes (256 sliding, 512 full, keys = values) and 4-bit
weights, small; a 64-key window wraps often."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

GPU_TEST_SHAPE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=256, global_head_dim=512, vocab_size=4096, sliding_window=64)


def gpu_test_model() -> tuple:
    """(model, config dict): bench/random_model.py's random 4-bit weights of GPU_TEST_SHAPE, seed 3."""
    from random_model import SHAPES, build_random_model

    SHAPES["gpu-test"] = GPU_TEST_SHAPE
    try:
        return build_random_model("gpu-test", 4, seed=3)
    finally:
        del SHAPES["gpu-test"]
