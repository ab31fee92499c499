"""Timing one runtime on one configuration: a warm-up that compiles every shape, then repeats, summarised.

Every runtime is timed by the same clock around its own generator: time to first token covers the prefill and the
first sample; decode speed is (tokens - 1) over the time from the first token to the last. Generators hand out
`int` tokens, so each step is finished when it is counted.
"""

import gc
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma4 import cache_writes, cuda_backend, cuda_source, decode_attention, fused_norms, quantized_matvec


def process_rss_bytes() -> int:
    """Resident memory now (Linux), else the process's peak (macOS reports ru_maxrss in bytes, Linux in KiB)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cache_bytes(cache: list) -> int:
    """Bytes of the buffers that hold the keys and values (rows reserved ahead included), the same measure for every
    runtime (ours and mlx-lm's caches all report `nbytes`)."""
    return sum(layer.nbytes for layer in cache)


def one_run(runtime, prompt: list, gen_tokens: int, options: dict) -> dict:
    # No mx.clear_cache() between runs: each run finds the allocator warm, as a second request to a server would.
    gc.collect()
    mx.reset_peak_memory()
    cache = runtime.make_cache()
    start = time.perf_counter()
    tokens, first, until_first = [], None, 0
    for step in runtime.steps(prompt, gen_tokens, cache, **options):
        tokens.append(int(step[0]))
        if len(tokens) == 1:
            first = time.perf_counter()
            # The prompt's peak apart from decoding's (the first step may be queued already: runtimes pipeline).
            until_first = mx.get_peak_memory()
            mx.reset_peak_memory()
    end = time.perf_counter()
    mx.synchronize()
    ttft, count = first - start, len(tokens)
    after_first = mx.get_peak_memory() if count > 1 else 0
    return {
        "time_to_first_token_s": ttft,
        "prefill_tps": len(prompt) / ttft,
        "decode_tps": (count - 1) / (end - first) if count > 1 else 0.0,
        "generated_tokens": count,
        "peak_memory_bytes": max(until_first, after_first),
        "peak_until_first_token_bytes": until_first,
        "peak_after_first_token_bytes": after_first,
        "process_rss_bytes": process_rss_bytes(),
        "kv_cache_bytes": cache_bytes(cache),
        "tokens": tokens,
    }


def summarise(runs: list) -> dict:
    """Median of each figure, with the spread (min and max) of the speeds and TTFT."""
    summary = {"tokens": runs[0]["tokens"]}
    for key in runs[0].keys() - {"tokens"}:
        values = [run[key] for run in runs]
        summary[key] = statistics.median(values)
        if key in ("time_to_first_token_s", "prefill_tps", "decode_tps"):
            summary[key + "_min"], summary[key + "_max"] = min(values), max(values)
    for key in ("peak_memory_bytes", "peak_until_first_token_bytes", "peak_after_first_token_bytes"):
        summary[key] = max(run[key] for run in runs)
    summary["repeats"] = len(runs)
    return summary


def measure(runtime, prompt: list, gen_tokens: int, repeat: int, warm_up: bool = True, **options) -> dict:
    """`options` go to the runtime's generate_step (KV quantization)."""
    if warm_up:
        if runtime.warm_up is not None:
            runtime.warm_up(prompt)
        one_run(runtime, prompt, gen_tokens, options)
    return summarise([one_run(runtime, prompt, gen_tokens, options) for _ in range(repeat)])


def weight_bytes(model) -> int:
    """Bytes of the model's parameters: what it holds resident whatever the context."""
    return sum(value.nbytes for _, value in tree_flatten(model.parameters()))


def random_prompt(length: int, vocab_size: int, seed: int) -> list:
    """Token ids away from the special ones at either end of the vocabulary; the same for every runtime."""
    generator = mx.random.key(seed)
    low, high = min(16, vocab_size // 4), max(vocab_size - 16, vocab_size * 3 // 4)
    return mx.random.randint(low, high, (length,), key=generator).tolist()


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def environment() -> dict:
    """What a result depends on beyond its command: versions, the device, the code, and whether our CUDA kernels
    took the decoding products, attention, norms and cache writes, and whether their text reached MLX through
    files (switches read from the environment, so the command alone does not say)."""
    on_cuda = cuda_backend.cuda_backend()
    return {"mlx": mx.__version__, "device": str(mx.default_device()), "python": sys.version.split()[0],
            "platform": sys.platform, "cpu_count": os.cpu_count(), "commit": source_commit(),
            "few_row_kernel": on_cuda and cuda_backend.switched_on(quantized_matvec.SWITCH),
            "decode_attention_kernel": on_cuda and cuda_backend.switched_on(decode_attention.SWITCH),
            "fused_norms_kernel": on_cuda and cuda_backend.switched_on(fused_norms.SWITCH),
            "in_place_cache_writes": on_cuda and cuda_backend.switched_on(cache_writes.SWITCH),
            "kernel_source_files": on_cuda and cuda_backend.switched_on(cuda_source.SWITCH),
            "gated_product": on_cuda and cuda_backend.switched_on(quantized_matvec.SWITCH)
            and cuda_backend.switched_on(quantized_matvec.GATE_SWITCH)}


def source_commit():
    """The repository's commit, with "+changes" when the tree differs from it; None where there is no git history
    (a copy of the tree, as on a lent GPU machine)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+changes" if changes.stdout.strip() else "")
