import os
import sys
from pathlib import Path

# The fixtures module sits beside the tests; no test may reach the Hub.
sys.path.insert(0, str(Path(__file__).parent))
os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_collection_modifyitems(config, items):
    import mlx.core as mx
    import pytest

    if mx.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs MLX's CUDA backend")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
