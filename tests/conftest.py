import os
import sys
from pathlib import Path

# The fixtures module sits beside the tests; no test may reach the Hub.
sys.path.insert(0, str(Path(__file__).parent))
os.environ["HF_HUB_OFFLINE"] = "1"
