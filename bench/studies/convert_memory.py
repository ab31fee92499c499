"""Peak resident memory of our converter next to mlx-lm's, on the same multi-shard random checkpoint.

    python bench/studies/convert_memory.py --work /tmp/convert_bench [--hidden 1536 --layers 24] [--shards 4]
    python bench/studies/convert_memory.py --work /tmp/convert_bench --shape 12b --layers 6 --json RESULT.json

Writes a random bfloat16 Gemma 4 unified checkpoint (Hugging Face names, safetensors shards + index, a small
tokenizer), then runs `python convert/convert.py -q` and `python -m mlx_lm convert -q` on it, each in its own process,
and reports each one's peak RSS (from wait4) against the largest input shard. mlx-lm strips the vision and audio
embedders (its Gemma 4 model is text only), so it converts slightly less.

Our converter holds one source tensor and its outputs at a time (convert/shards.py), so its peak follows the largest
tensor, not the checkpoint: `--shape 12b` writes the 12B's own tensors (vocabulary 262144 x 3840 embedding, MLP
15360, 16 heads, 8 kv heads x 256, 1 x 512 on full layers) with only --layers of its 48 layers, and two such runs of
different depth show whether the peak stays put as the checkpoint grows.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from math import prod
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 262_144


def bench_config(hidden: int, layers: int, shape: str) -> dict:
    text = dict(
        model_type="gemma4_unified_text", hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8, global_head_dim=hidden // 4,
        num_global_key_value_heads=1, attention_k_eq_v=True, vocab_size=VOCAB, sliding_window=512,
        final_logit_softcapping=30.0, hidden_size_per_layer_input=0, num_kv_shared_layers=0, dtype="bfloat16",
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
    )
    vision = dict(mm_embed_dim=hidden, output_proj_dims=hidden)
    if shape == "12b":
        from quantized_size import GEMMA_4_12B

        text.update({k: v for k, v in GEMMA_4_12B["text_config"].items() if k != "num_hidden_layers"},
                    sliding_window=1024)
        vision = GEMMA_4_12B["vision_config"]
    return dict(
        model_type="gemma4_unified", architectures=["Gemma4UnifiedForConditionalGeneration"], vocab_size=VOCAB,
        text_config=text, vision_config=vision, audio_config=dict(audio_embed_dim=640), dtype="bfloat16",
    )


def hugging_face_name(name: str) -> str:
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    return "model." + name


def write_random_checkpoint(folder: Path, config: dict, shards: int):
    """Runs in a child process (see main): the measuring parent stays small, since a forked child starts out
    counting its parent's resident pages."""
    sys.path[:0] = [str(REPOSITORY_ROOT), str(REPOSITORY_ROOT / "tests")]
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from reference_models import save_tokenizer

    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.model import Model

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(folder, 400)
    shapes = {hugging_face_name(k): v.shape for k, v in tree_flatten(Model(ModelConfig.from_dict(config)).parameters())}
    total = sum(2 * prod(shape) for shape in shapes.values())
    budget = total / shards
    groups, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = shape
        size += 2 * prod(shape)
        if size >= budget:
            groups.append(current)
            current, size = {}, 0
    if current:
        groups.append(current)
    weight_map = {}
    for index, group in enumerate(groups):
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        arrays = {
            name: (mx.ones(shape) if len(shape) == 1 else 0.02 * mx.random.normal(shape)).astype(mx.bfloat16)
            for name, shape in group.items()
        }
        mx.save_safetensors(str(folder / file), arrays, metadata={"format": "pt"})
        weight_map.update({name: file for name in group})
        del arrays
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def largest_tensor_bytes(folder: Path) -> int:
    """From the safetensors headers: the biggest single tensor of the checkpoint."""
    largest = 0
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        largest = max([largest] + [end - start for name, entry in header.items() if name != "__metadata__"
                                   for start, end in [entry["data_offsets"]]])
    return largest


def peak_rss(command: list) -> tuple:
    """(peak RSS in bytes, seconds, exit code) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPOSITORY_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code:
        print(process.stderr.read().decode()[-2000:], file=sys.stderr)
    return usage.ru_maxrss * 1024, seconds, code


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/convert_bench"))
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--shape", choices=("scaled", "12b"), default="scaled",
                        help="12b: the 12B's tensor shapes (--hidden ignored), --layers of its layers")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--ours-only", action="store_true", help="leave out mlx-lm's run")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--write-checkpoint-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    source = args.work / "hf"
    if args.write_checkpoint_only:
        write_random_checkpoint(source, bench_config(args.hidden, args.layers, args.shape), args.shards)
        return
    if not source.exists():
        subprocess.run([sys.executable, __file__, "--write-checkpoint-only", "--work", str(args.work), "--hidden",
                        str(args.hidden), "--layers", str(args.layers), "--shape", args.shape, "--shards",
                        str(args.shards)], check=True)
    shard_sizes = [p.stat().st_size for p in source.glob("*.safetensors")]
    largest = max(shard_sizes)
    print(f"input: {len(shard_sizes)} shards, {sum(shard_sizes) / 1e9:.2f} GB, largest {largest / 1e9:.2f} GB")
    results = {"command": "python " + " ".join(sys.argv), "input_shards": len(shard_sizes),
               "input_gigabytes": round(sum(shard_sizes) / 1e9, 3), "largest_shard_gigabytes": round(largest / 1e9, 3),
               "largest_tensor_gigabytes": round(largest_tensor_bytes(source) / 1e9, 3), "runs": []}

    python = sys.executable
    runs = {
        "python + imports only (the constant)": [python, "-c", "import convert.pipeline, mlx_lm.convert"],
        "mlx-gemma4 convert/convert.py -q": [
            python, "convert/convert.py", "--hf-path", str(source), "--mlx-path", str(args.work / "ours"), "-q"],
        "mlx-lm convert -q": [
            python, "-m", "mlx_lm", "convert", "--hf-path", str(source), "--mlx-path", str(args.work / "mlx_lm"),
            "-q"],
    }
    if args.ours_only:
        del runs["mlx-lm convert -q"]
    print(f"{'run':40s} {'peak RSS':>10s} {'x largest shard':>16s} {'seconds':>8s}")
    for label, command in runs.items():
        for output in ("ours", "mlx_lm"):
            shutil.rmtree(args.work / output, ignore_errors=True)
        rss, seconds, code = peak_rss(command)
        status = "" if code == 0 else f"  (exit {code})"
        print(f"{label:40s} {rss / 1e9:9.2f}G {rss / largest:16.2f} {seconds:8.1f}{status}", flush=True)
        results["runs"].append({"run": label, "peak_rss_gigabytes": round(rss / 1e9, 3), "seconds": round(seconds, 1),
                                "exit_code": code})
        if (args.work / "ours").exists():  # measured before the next run clears it
            results["output_gigabytes"] = round(
                sum(p.stat().st_size for p in (args.work / "ours").glob("*.safetensors")) / 1e9, 3)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
