"""Benchmark mlx_gemma4 against mlx-lm and mlx-vlm on the same weights: tok/s, time to first token, memory.

    python bench/bench.py --random tiny --bits 32 --prompt-tokens 64 --gen-tokens 32 --peers mlx-lm,mlx-vlm
    python bench/bench.py --random 12b --bits 4 --prompt-tokens 512 --peers mlx-lm,mlx-vlm,mlx-vlm-lm \
        --cost-model --random-draft --long-context 32768,131072 --json h100.json

Each configuration is run once to compile its shapes, then --repeat times; the table shows medians with the
(min-max) spread. Peers load the folder our weights were written to (a temporary one for --random). With a drafter
(--draft-model or --random-draft), mlx-vlm among the peers also runs its own MTP loop on the same assistant at the
same --num-draft-tokens (bench/peer_mtp.py).
"""

import argparse
import gc
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

from measure import environment, log, measure, random_prompt, weight_bytes  # noqa: E402
from mlx_gemma4.errors import Gemma4Error  # noqa: E402
from mlx_gemma4.json_files import read_json  # noqa: E402
from mlx_gemma4.loading import resolve_model_path  # noqa: E402
from mlx_gemma4 import cache_writes, decode_attention, fused_norms, quantized_matvec  # noqa: E402
from peer_mtp import (  # noqa: E402
    NO_MLX_LM_MTP, assistant_source_config, mtp_rows, run_peer_mtp, save_peer_assistant)
from peers import PEERS, load_peers, ours, peer_installed  # noqa: E402
from report import markdown, write_json  # noqa: E402
from roofline import machine_bandwidth, roofline_fraction  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model folder or Hub id")
    source.add_argument("--random", metavar="SHAPE", help="random weights of a named shape: tiny, small, medium, 12b")
    source.add_argument("--kernel-table", action="store_true",
                        help="CUDA only: the few-row quantized product against mx.quantized_matmul at the 12B shapes")
    parser.add_argument("--bits", type=int, default=4, help="--random precision: 4, 8, 16 (bfloat16), 32 (float32)")
    parser.add_argument("--prompt-tokens", default="512", help="comma list of prompt lengths")
    parser.add_argument("--prompt-file", help="text whose tokens make the prompts (needs --model); else random ids")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peers", default="", help="comma list of mlx-lm, mlx-vlm, mlx-vlm-lm")
    parser.add_argument("--image", type=int, default=0, metavar="SOFT_TOKENS", help="synthetic image prompt size")
    parser.add_argument("--audio", type=float, default=0.0, metavar="SECONDS", help="synthetic audio prompt length")
    parser.add_argument("--draft-model", help="assistant folder or Hub id for MTP")
    parser.add_argument("--random-draft", action="store_true", help="a random assistant that fits the model")
    parser.add_argument("--num-draft-tokens", default="adaptive", help="comma list of K values and/or 'adaptive'")
    parser.add_argument("--cost-model", action="store_true", help="relative cost of target passes and draft steps")
    parser.add_argument("--controlled-acceptance", default="", metavar="RATES",
                        help="comma list, e.g. 0.5,0.7,0.9: MTP with a drafter that proposes the target's own greedy "
                             "token at that rate (bench/controlled_drafter.py), at every --num-draft-tokens")
    parser.add_argument("--long-context", default="", help="comma list of prefill depths, e.g. 32768,131072")
    parser.add_argument("--long-context-gen-tokens", type=int, default=32)
    parser.add_argument("--long-context-kv-bits", default="none",
                        help="comma list of KV cache precisions for the long-context runs: none, 8, 4")
    parser.add_argument("--time-budget", type=float, default=0.0, help="seconds; later long-context runs skip")
    parser.add_argument("--bandwidth", type=float, help="memory bandwidth in GB/s (overrides the chip table)")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--weights-dir", help="--random with --peers: write (and keep) the weights here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-bits", default="4,8", help="--kernel-table: comma list of 4 and/or 8")
    parser.add_argument("--table-layers", default="",
                        help="--kernel-table: comma list of layer names to time (default: every 12B shape)")
    parser.add_argument("--no-matvec-kernel", action="store_true",
                        help="CUDA: our model's few-row products through MLX's kernels, not ours (MLX_GEMMA4_MATVEC=0)")
    parser.add_argument("--no-attention-kernel", action="store_true",
                        help="CUDA: our decoding steps' attention through MLX operations, not our kernels "
                             "(MLX_GEMMA4_DECODE_ATTENTION=0)")
    parser.add_argument("--no-fused-norms", action="store_true",
                        help="CUDA: our decoding steps' norms, residual sums and rotations through MLX operations, not "
                             "our kernels (MLX_GEMMA4_FUSED_NORMS=0)")
    parser.add_argument("--no-gated-product", action="store_true",
                        help="CUDA: gelu_tanh(gate) * up as a kernel of its own after the gate+up product, not in the "
                             "product's last step (MLX_GEMMA4_GATED_PRODUCT=0)")
    parser.add_argument("--no-in-place-writes", action="store_true",
                        help="CUDA: our compiled steps write their keys and values through MLX's put_along_axis, "
                             "not in place (MLX_GEMMA4_IN_PLACE_WRITES=0)")
    parser.add_argument("--skip-ours", action="store_true",
                        help="run the peers only, e.g. to give their long-context runs a call of their own")
    return parser.parse_args(argv)


# KV quantization groups in the long-context runs: mlx-lm's default.
KV_GROUP_SIZE = 64


def int_list(text: str) -> list:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise Gemma4Error(f"expected a comma list of integers, got {text!r}") from None


def kv_bits_list(text: str) -> list:
    """'none,8' -> [None, 8]."""
    values = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return [None if value == "none" else int(value) for value in values]
    except ValueError:
        raise Gemma4Error(f"expected a comma list of none, 8 or 4, got {text!r}") from None


def peer_names(text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise Gemma4Error(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
    return names


class Bench:
    """Runs the configurations for one runtime after another and keeps every result in `results`."""

    def __init__(self, args, results: dict, machine: dict, weight_bytes: int):
        self.args, self.results, self.machine, self.weight_bytes = args, results, machine, weight_bytes
        self.started = time.perf_counter()
        self.our_tokens = {}

    def save(self):
        if self.args.json:
            write_json(self.results, Path(self.args.json))

    def row(self, runtime, config: str, figures: dict) -> dict:
        """A result row; the generated tokens are compared with ours (same weights, greedy) and then dropped."""
        tokens = figures.pop("tokens")
        if runtime.name == "ours":
            self.our_tokens[config] = tokens
        elif config in self.our_tokens:
            ours = self.our_tokens[config]
            figures["tokens_agreeing_with_ours"] = next(
                (i for i, (a, b) in enumerate(zip(tokens, ours)) if a != b), min(len(tokens), len(ours)))
        row = {"config": config, "runtime": runtime.name, **figures}
        row["roofline_fraction"] = roofline_fraction(self.weight_bytes, row.get("decode_tps"),
                                                     self.machine["bandwidth_gbps"])
        return row

    def generation(self, runtime, prompts: dict):
        for length, prompt in prompts.items():
            log(f"{runtime.name}: prompt {length}, {self.args.gen_tokens} new tokens")
            figures = measure(runtime, prompt, self.args.gen_tokens, self.args.repeat)
            self.results["generation"].append(self.row(runtime, f"prompt {length}", figures))
            self.save()

    def long_context(self, runtime, vocab_size: int):
        """Each depth at each KV precision: speeds, peak memory, and the transient part of it (peak - weights -
        KV cache), the memory table's figures."""
        weights = weight_bytes(runtime.model)
        for kv_bits in kv_bits_list(self.args.long_context_kv_bits):
            for depth in int_list(self.args.long_context):
                entry = {"depth": depth, "runtime": runtime.name, "kv_bits": kv_bits, "weights_bytes": weights}
                elapsed = time.perf_counter() - self.started
                if self.args.time_budget and elapsed > self.args.time_budget:
                    entry["skipped"] = f"time budget ({elapsed:.0f} s spent)"
                else:
                    log(f"{runtime.name}: long context {depth}, KV {kv_bits or 'unquantized'}")
                    prompt = random_prompt(depth, vocab_size, self.args.seed + depth)
                    options = {} if kv_bits is None else dict(kv_bits=kv_bits, kv_group_size=KV_GROUP_SIZE,
                                                               quantized_kv_start=0)
                    try:
                        figures = measure(runtime, prompt, self.args.long_context_gen_tokens, 1, warm_up=False,
                                          **options)
                        figures.pop("tokens")
                        entry.update(figures)
                        held = weights + figures["kv_cache_bytes"]
                        entry["transient_bytes"] = figures["peak_memory_bytes"] - held
                        # Which sets the peak: the prefill, or decoding at depth.
                        entry["transient_until_first_token_bytes"] = figures["peak_until_first_token_bytes"] - held
                        entry["transient_after_first_token_bytes"] = figures["peak_after_first_token_bytes"] - held
                    except (Gemma4Error, RuntimeError, ValueError, MemoryError, NotImplementedError,
                            TypeError) as error:
                        # A peer that cannot run this (mlx-lm cannot quantize Gemma 4's rotating caches) is a
                        # finding for the table, not a crash.
                        entry["skipped"] = f"failed: {str(error).splitlines()[0][:120]}"
                self.results["long_context"].append(entry)
                self.save()


def load_target(args):
    """(model, folder the peers can load or None, random config dict or None)."""
    if args.random:
        from random_model import build_random_model

        model, config = build_random_model(args.random, args.bits, args.seed)
        return model, None, config
    from mlx_gemma4.loading import load_model

    folder = resolve_model_path(args.model)
    return load_model(folder), folder, None


def make_prompts(args, model) -> dict:
    vocab = model.config.text_config.vocab_size
    lengths = int_list(args.prompt_tokens)
    if not args.prompt_file:
        return {n: random_prompt(n, vocab, args.seed + n) for n in lengths}
    if args.random:
        raise Gemma4Error("--prompt-file needs --model (a tokenizer)")
    from mlx_gemma4.processor import Processor

    processor = Processor.from_folder(resolve_model_path(args.model), model.config)
    ids = processor.encode(Path(args.prompt_file).read_text(encoding="utf-8", errors="ignore"))
    while len(ids) < max(lengths):
        ids = ids + ids
    return {n: ids[:n] for n in lengths}


def run_ours(bench: Bench, args, model, drafter, prompts: dict):
    bench.generation(ours(model), prompts)
    if args.image or args.audio:
        from multimodal_prompt import label, media_prompt, multimodal_runtime

        prompt = media_prompt(model.config, args.image, args.audio, args.seed)
        log(f"ours: multimodal {label(prompt)}")
        figures = measure(multimodal_runtime(model, prompt), prompt["ids"], args.gen_tokens, args.repeat)
        bench.results["multimodal"].append(bench.row(ours(model), label(prompt), figures))
    if drafter is not None:
        run_mtp(bench, args, model, drafter, prompts)
    if drafter is not None and args.controlled_acceptance:
        run_controlled_mtp(bench, args, model, drafter, prompts)
    if args.cost_model:
        from mtp import cost_model

        log("ours: MTP cost model")
        bench.results["cost_model"] = cost_model(model, drafter, next(iter(prompts.values())))
    bench.long_context(ours(model), model.config.text_config.vocab_size)
    bench.save()


def load_drafter(args, config_dict):
    if args.draft_model:
        from mlx_gemma4.drafter import load_drafter as load

        return load(args.draft_model)
    if args.random_draft:
        if config_dict is None:
            raise Gemma4Error("--random-draft needs --random (a random target to fit)")
        from random_model import build_random_assistant

        return build_random_assistant(config_dict, args.bits, args.seed + 1)
    return None


def run_mtp(bench: Bench, args, model, drafter, prompts: dict):
    from mtp import speculative_runtime

    mtp_rows(bench, args, prompts, "ours", lambda k, statistics: speculative_runtime(model, drafter, k, statistics),
             lambda k: "adaptive K" if k is None else f"K={k}")


def run_controlled_mtp(bench: Bench, args, model, drafter, prompts: dict):
    from controlled_drafter import ControlledDrafter
    from mtp import speculative_runtime
    from peer_mtp import draft_lengths, mtp_row

    from mlx_gemma4.speculative import DraftStatistics

    plain = {row["config"]: row["decode_tps"] for row in bench.results["generation"] if row["runtime"] == "ours"}
    vocab_size = model.config.text_config.vocab_size
    for length, prompt in prompts.items():
        config = f"prompt {length}"
        for acceptance in [float(part) for part in args.controlled_acceptance.split(",") if part.strip()]:
            for k in draft_lengths(args.num_draft_tokens):
                statistics = DraftStatistics()
                controlled = ControlledDrafter(drafter, bench.our_tokens[config], length, acceptance, vocab_size,
                                               args.seed)
                runtime = speculative_runtime(model, controlled, k, statistics)
                log(f"{runtime.name}: prompt {length}, controlled acceptance {acceptance}")
                figures = measure(runtime, prompt, args.gen_tokens, args.repeat)
                draft = f"controlled acceptance {acceptance}, {'adaptive K' if k is None else f'K={k}'}"
                row = mtp_row(bench, runtime, config, figures, statistics, k, draft, plain.get(config))
                bench.results["mtp"].append({**row, "controlled_acceptance": acceptance})
                bench.save()


def run_peers(bench: Bench, args, folder: Path, prompts: dict, vocab_size: int, assistant_folder=None):
    names = [name for name in peer_names(args.peers) if peer_installed(name)]
    for name in sorted(set(peer_names(args.peers)) - set(names)):
        bench.results["notes"].append(f"{name} is not installed: skipped")
    if (args.draft_model or args.random_draft) and "mlx-lm" in names:
        bench.results["notes"].append(NO_MLX_LM_MTP)
    if args.long_context and "mlx-vlm-lm" in names:
        bench.results["notes"].append("long context: mlx-vlm-lm left out (mlx-vlm's model, mlx-lm's loop)")
    runtimes = load_peers(names, folder)
    while True:
        try:
            runtime = next(runtimes)
        except StopIteration:
            break
        except Exception as error:  # a peer that cannot read these weights is a finding, not a crash
            bench.results["notes"].append(f"a peer could not load the weights: {str(error).splitlines()[0][:160]}")
            break
        bench.generation(runtime, prompts)
        if runtime.name == "mlx-vlm" and assistant_folder is not None:
            run_peer_mtp(bench, args, runtime.model, assistant_folder, prompts)
        if runtime.name != "mlx-vlm-lm":
            bench.long_context(runtime, vocab_size)
        del runtime
        gc.collect()
        mx.clear_cache()


def main(argv=None):
    args = parse_args(argv)
    if args.no_matvec_kernel:
        os.environ[quantized_matvec.SWITCH] = "0"
    if args.no_attention_kernel:
        os.environ[decode_attention.SWITCH] = "0"
    if args.no_fused_norms:
        os.environ[fused_norms.SWITCH] = "0"
    if args.no_gated_product:
        os.environ[quantized_matvec.GATE_SWITCH] = "0"
    if args.no_in_place_writes:
        os.environ[cache_writes.SWITCH] = "0"
    machine = machine_bandwidth(args.bandwidth)
    if args.kernel_table:
        return run_kernel_table(args, machine)
    model, folder, config_dict = load_target(args)
    from random_model import weight_bytes_per_token

    prompts = make_prompts(args, model)
    vocab_size = model.config.text_config.vocab_size
    results = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv or sys.argv[1:])),
        "model": args.model or f"random {args.random}", "precision": precision(args, model),
        "machine": machine, "environment": environment(), "weight_bytes_per_token": weight_bytes_per_token(model),
        "gen_tokens": args.gen_tokens, "notes": [], "generation": [], "multimodal": [], "mtp": [],
        "cost_model": None, "long_context": [],
    }
    bench = Bench(args, results, machine, results["weight_bytes_per_token"])
    drafter = load_drafter(args, config_dict)
    with tempfile.TemporaryDirectory(prefix="gemma4-bench-") as scratch:
        assistant_folder = None
        if args.peers:
            folder, assistant_folder = save_for_peers(args, model, drafter, config_dict, folder, Path(scratch))
        if not args.skip_ours:
            run_ours(bench, args, model, drafter, prompts)
        del model, drafter
        gc.collect()
        mx.clear_cache()
        if args.peers:
            run_peers(bench, args, folder, prompts, vocab_size, assistant_folder)
    bench.save()
    print(markdown(results))


def table_layers(args):
    """--table-layers as a set of SHAPES_12B names (None: all); an unknown name is an error, not an empty table."""
    from matvec_table import SHAPES_12B

    if not args.table_layers:
        return None
    names = {name.strip() for name in args.table_layers.split(",") if name.strip()}
    unknown = names - {name for name, _, _ in SHAPES_12B}
    if unknown:
        raise Gemma4Error(f"unknown --table-layers {', '.join(sorted(unknown))}; "
                          f"choose from {', '.join(name for name, _, _ in SHAPES_12B)}")
    return names


def run_kernel_table(args, machine: dict):
    from matvec_table import kernel_table, markdown_table

    results = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
               "machine": machine, "environment": environment(),
               "kernel_table": kernel_table(int_list(args.table_bits), machine["bandwidth_gbps"], log,
                                            table_layers(args))}
    bench_save = Path(args.json) if args.json else None
    if bench_save:
        write_json(results, bench_save)
    print(markdown_table(results["kernel_table"], machine["bandwidth_gbps"]))


def save_for_peers(args, model, drafter, config_dict, folder, scratch: Path):
    """(target folder, assistant folder or None) in the converted layout the peers read, with every field written
    out; the assistant only when mlx-vlm will run its MTP on it."""
    from random_model import peer_readable_config, save_converted

    target_config = config_dict or peer_readable_config(read_json(folder / "config.json"), model)
    folder = Path(args.weights_dir or scratch / "weights")
    log(f"writing the weights in the converted layout for the peers to {folder}")
    save_converted(model, target_config, folder)
    if drafter is None or "mlx-vlm" not in peer_names(args.peers) or not peer_installed("mlx-vlm"):
        return folder, None
    assistant_folder = folder.with_name(folder.name + "-assistant")
    log(f"writing the assistant for mlx-vlm to {assistant_folder}")
    save_peer_assistant(drafter, assistant_source_config(args, config_dict), assistant_folder)
    return folder, assistant_folder


def precision(args, model) -> str:
    quantization = model.config.quantization
    if quantization:
        return f"{quantization['bits']}-bit, group {quantization['group_size']}"
    if args.random:
        return {16: "bfloat16", 32: "float32"}[args.bits]
    return str(model.language_model.model.norm.weight.dtype).replace("mlx.core.", "")


if __name__ == "__main__":
    try:
        main()
    except Gemma4Error as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
