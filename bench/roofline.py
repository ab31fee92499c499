"""Memory bandwidth of the machine, for the decode roofline: weight bytes read per token / time per token /
bandwidth. Decode of a dense model reads every weight once per token, so bandwidth bounds it.

Peak figures from the vendors' specifications (GB/s). Binned chips with a narrower bus (M3 Max 14-core, M4 Max
14-core) read less; pass --bandwidth to override.
"""

import shutil
import subprocess
import sys
from typing import Optional

import mlx.core as mx

# Longest names first, so "M2 Ultra" is found before "M2".
APPLE_BANDWIDTH_GBPS = {
    "M1 Ultra": 800, "M1 Max": 400, "M1 Pro": 200, "M1": 68.25,
    "M2 Ultra": 800, "M2 Max": 400, "M2 Pro": 200, "M2": 100,
    "M3 Ultra": 819, "M3 Max": 400, "M3 Pro": 150, "M3": 100,
    "M4 Max": 546, "M4 Pro": 273, "M4": 120,
    "M5": 153,
}
NVIDIA_BANDWIDTH_GBPS = {
    "H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "GH200": 4000,
    "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "RTX 4090": 1008,
}


def lookup(name: str, table: dict) -> Optional[tuple]:
    for chip in sorted(table, key=len, reverse=True):
        if chip in name:
            return chip, table[chip]
    return None


def device_names() -> list:
    names = []
    try:
        names.append(str(mx.device_info().get("device_name", "")))
    except (AttributeError, RuntimeError):
        pass
    if sys.platform == "darwin":
        names.append(command_output(["sysctl", "-n", "machdep.cpu.brand_string"]))
    if shutil.which("nvidia-smi"):
        names.extend(command_output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).splitlines()[:1])
    return names


def command_output(command: list) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_bandwidth(override_gbps: Optional[float] = None) -> dict:
    """{"name", "bandwidth_gbps", "source"}; bandwidth None when the chip is unknown and no override is given."""
    names = [n for n in device_names() if n]
    if override_gbps:
        return {"name": names[0] if names else "unknown", "bandwidth_gbps": override_gbps, "source": "--bandwidth"}
    for name in names:
        found = lookup(name, NVIDIA_BANDWIDTH_GBPS) or lookup(name, APPLE_BANDWIDTH_GBPS)
        if found:
            return {"name": name, "bandwidth_gbps": found[1], "source": f"table ({found[0]})"}
    return {"name": names[0] if names else "unknown", "bandwidth_gbps": None, "source": "unknown chip"}


def roofline_fraction(weight_bytes: int, decode_tps: float, bandwidth_gbps: Optional[float]) -> Optional[float]:
    if not bandwidth_gbps or not decode_tps:
        return None
    return weight_bytes * decode_tps / (bandwidth_gbps * 1e9)
