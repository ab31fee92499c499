"""Quantization quality on trained weights: KL divergence and top-1 agreement against the unquantized model on
held-out text, per converter recipe, with the bits per weight and size each recipe gives the real 12B.

    python bench/studies/train_small_pair.py --out bench/artifacts/small-pair     (first: the target is scored)
    python bench/studies/quant_quality.py --target bench/artifacts/small-pair/target --json RESULT.json

Every recipe goes through the converter itself (`convert.pipeline.convert`) and the converted folder is loaded by
mlx_gemma4's loader, so each row scores exactly what a user's conversion would give. MLX's quantized matmul is slow
on the CPU, so each quantized layer is then swapped for a plain one holding `mx.dequantize` of its weights: the same
function (the quantized kernels compute with the same dequantized values); the script checks this on the default
recipe and records the largest logit difference and the KL between the two. All of it runs in float32, the
trained checkpoint's dtype, so the rows measure quantization alone.

Held-out text is the Python standard library files train_small_pair.py kept out of training. Real QAT checkpoints
are not reachable offline: the QAT rows use the trained weights moved onto the q4_0 grid (every matrix --qat maps),
saved as a checkpoint of their own, and score --qat and plain -q on it against that checkpoint unquantized.
"""

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY_ROOT))

from convert import qat  # noqa: E402
from convert.checkpoint import read_checkpoint  # noqa: E402
from convert.layout import make_layout  # noqa: E402
from convert.pipeline import convert  # noqa: E402
from convert.quantize import QuantizationSettings, plan_quantization  # noqa: E402
from mlx_gemma4.config import ModelConfig  # noqa: E402
from mlx_gemma4.loading import load_model  # noqa: E402
from mlx_gemma4.model import Model  # noqa: E402
from quantized_size import GEMMA_4_12B, sizes  # noqa: E402
from train_small_pair import stdlib_texts, token_stream  # noqa: E402

BATCH_WINDOWS = 8
# Student-t 97.5% point is ~2.0 for the few dozen windows scored; the intervals are over windows, not tokens
# (tokens of one window are not independent).
INTERVAL_Z = 2.0
# (label, convert() keyword arguments); the 12B size comes from the same settings.
RECIPES = [
    ("4-bit g64 (`-q`, the default)", {}),
    ("4-bit g32 (`-q --q-group-size 32`)", {"q_group_size": 32}),
    ("4-bit, MLP 8-bit (`-q --quant-predicate mlp_8`)", {"quant_predicate": "mlp_8"}),
    ("mixed_4_8 (`-q --quant-predicate mixed_4_8`)", {"quant_predicate": "mixed_4_8"}),
    ("8-bit g64 (`-q --q-bits 8`)", {"q_bits": 8}),
]
QAT_RECIPES = [
    ("`--qat` (exact q4_0 mapping, 4-bit g32)", {"qat": True}),
    ("`-q` (4-bit g64) on the same weights", {}),
    ("`-q --q-group-size 32` on the same weights", {"q_group_size": 32}),
]


def settings_of(options: dict) -> QuantizationSettings:
    return QuantizationSettings.from_flags(options.get("q_bits"), options.get("q_group_size"),
                                           options.get("quant_predicate"), options.get("qat", False))


def dequantized(model: nn.Module) -> nn.Module:
    """Each quantized layer replaced by a plain one holding its dequantized weights (the same function)."""
    def plain(_, module):
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return module
        weight = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits,
                               mode=getattr(module, "mode", "affine"))
        if isinstance(module, nn.QuantizedEmbedding):
            replacement = nn.Embedding(*weight.shape)
        else:
            replacement = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                replacement.bias = module.bias
        replacement.weight = weight
        return replacement

    model.update_modules(tree_map_with_path(plain, model.leaf_modules(), is_leaf=nn.Module.is_module))
    mx.eval(model.parameters())
    return model


def held_out_windows(target: Path, count: int, length: int) -> np.ndarray:
    """`count` windows of `length` tokens spread evenly over the held-out text of the target's training run."""
    from transformers import AutoTokenizer

    report = json.loads((target.parent / "training_report.json").read_text())
    _, texts = stdlib_texts(report["seed"], report["corpus_megabytes"])
    ids = token_stream(AutoTokenizer.from_pretrained(str(target)), texts).tolist()
    stride = (len(ids) - length) // count
    assert stride >= length, "fewer held-out tokens than the windows asked for"
    return np.stack([ids[i * stride:i * stride + length] for i in range(count)]).astype(np.int32)


def log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def reference_outputs(model: Model, windows: np.ndarray) -> list:
    """Per batch of windows, the unquantized model's log-probabilities (kept to score every recipe against)."""
    outputs = []
    for start in range(0, len(windows), BATCH_WINDOWS):
        logprobs = log_softmax(model(mx.array(windows[start:start + BATCH_WINDOWS])).astype(mx.float32))
        mx.eval(logprobs)
        outputs.append(logprobs)
    return outputs


def mean_and_interval(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()),
            "interval_95": float(INTERVAL_Z * values.std(ddof=1) / math.sqrt(len(values)))}


def score(model: Model, windows: np.ndarray, references: list) -> dict:
    """KL(reference || quantized) in nats per token, top-1 agreement with the reference, held-out perplexity."""
    kl, agreement, negative_log_likelihood = [], [], []
    for index, start in enumerate(range(0, len(windows), BATCH_WINDOWS)):
        batch = windows[start:start + BATCH_WINDOWS]
        reference = references[index]
        logprobs = log_softmax(model(mx.array(batch)).astype(mx.float32))
        kl.append(np.array((mx.exp(reference) * (reference - logprobs)).sum(-1).mean(-1)))
        agreement.append(np.array((reference.argmax(-1) == logprobs.argmax(-1)).mean(-1)))
        targets = mx.array(batch[:, 1:, None])
        negative_log_likelihood.append(np.array(-mx.take_along_axis(logprobs[:, :-1], targets, -1).mean((1, 2))))
    kl, agreement = np.concatenate(kl), np.concatenate(agreement)
    return {"kl_nats_per_token": mean_and_interval(kl), "top1_agreement": mean_and_interval(agreement),
            "held_out_perplexity": float(np.exp(np.concatenate(negative_log_likelihood).mean()))}


def size_on_12b(model_12b: Model, settings: QuantizationSettings) -> dict:
    parts = sizes(model_12b, settings)
    total = sum(parts.values())
    parameters = sum(value.size for _, value in tree_flatten(model_12b.parameters()))
    return {"gigabytes_12b": round(total / 1e9, 3), "bits_per_weight_12b": round(8 * total / parameters, 3)}


def snapped_to_q4_0_grid(source: Path, folder: Path) -> Path:
    """A copy of the checkpoint whose matrices that --qat maps sit on the q4_0 grid: QAT-like weights."""
    checkpoint = read_checkpoint(source)
    layout = make_layout(checkpoint)
    plan = plan_quantization(layout, settings_of({"qat": True}))
    on_grid = {layout.source_names[name] for name in layout.source_names if layout.path_of(name) in plan}
    shutil.copytree(source, folder)
    for file in checkpoint.files:
        arrays = mx.load(str(file))
        snapped = {name: qat.dequantize_q4_0(array).astype(array.dtype) if name in on_grid else array
                   for name, array in arrays.items()}
        mx.save_safetensors(str(folder / file.name), snapped, metadata={"format": "pt"})
    return folder


def quantized_rows(source: Path, recipes: list, windows: np.ndarray, scratch: Path, model_12b: Model) -> dict:
    unquantized = load_model(source)
    references = reference_outputs(unquantized, windows)
    perplexity = score(unquantized, windows, references)["held_out_perplexity"]
    print(f"{'unquantized':52s} ppl {perplexity:.3f}", flush=True)
    rows = []
    for index, (label, options) in enumerate(recipes):
        folder = convert(str(source), str(scratch / f"{source.name}-recipe-{index}"), quantize=True, progress=False,
                         **options)
        figures = score(dequantized(load_model(folder)), windows, references)
        rows.append({"recipe": label, "convert_options": options, **figures,
                     **size_on_12b(model_12b, settings_of(options))})
        print(f"{label:52s} KL {figures['kl_nats_per_token']['mean']:.5f} "
              f"top-1 {figures['top1_agreement']['mean']:.4f} ppl {figures['held_out_perplexity']:.3f}", flush=True)
        shutil.rmtree(folder)
    return {"unquantized_held_out_perplexity": perplexity, "rows": rows}


def dequantization_check(source: Path, windows: np.ndarray, scratch: Path) -> dict:
    """The default recipe through MLX's quantized kernels and through dequantized weights, on one window."""
    folder = convert(str(source), str(scratch / "check"), quantize=True, progress=False)
    window = mx.array(windows[:1])
    kernels = log_softmax(load_model(folder)(window).astype(mx.float32))
    plain = log_softmax(dequantized(load_model(folder))(window).astype(mx.float32))
    shutil.rmtree(folder)
    return {"max_abs_logprob_difference": mx.abs(kernels - plain).max().item(),
            "kl_kernels_vs_dequantized": (mx.exp(kernels) * (kernels - plain)).sum(-1).mean().item()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, default=Path("bench/artifacts/small-pair/target"))
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    windows = held_out_windows(args.target, args.windows, args.length)
    model_12b = Model(ModelConfig.from_dict(GEMMA_4_12B))  # lazy parameters: shapes only
    unquantized_12b = sizes(model_12b, None)
    results = {
        "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
        "training_report": json.loads((args.target.parent / "training_report.json").read_text()),
        "held_out": {"windows": args.windows, "tokens_per_window": args.length},
        "unquantized_12b_gigabytes": round(sum(unquantized_12b.values()) / 1e9, 3),
    }
    with tempfile.TemporaryDirectory(prefix="quant-quality-") as scratch:
        scratch = Path(scratch)
        results["dequantization_check"] = dequantization_check(args.target, windows, scratch)
        print(f"quantized kernels vs dequantized weights: {results['dequantization_check']}", flush=True)
        results["recipes"] = quantized_rows(args.target, RECIPES, windows, scratch, model_12b)
        qat_like = snapped_to_q4_0_grid(args.target, scratch / "qat-like")
        # How far the snapping itself moved the trained model (real QAT training would have compensated).
        results["qat_like_checkpoint_against_trained"] = score(
            load_model(qat_like), windows, reference_outputs(load_model(args.target), windows))
        print("on QAT-like (q4_0-grid) weights, against them unquantized:", flush=True)
        results["qat_like"] = quantized_rows(qat_like, QAT_RECIPES, windows, scratch, model_12b)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
