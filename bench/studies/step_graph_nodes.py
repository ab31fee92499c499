"""How many nodes does a compiled decoding step hand MLX, by kind, on the CUDA path? Counted on any machine: our CUDA
kernels are stood in for by one node each (zeros made to depend on the kernel's inputs, MLX's `Depends`), and the
step's graph is read with mx.export_to_dot, never evaluated. On the CPU, MLX's fast operations (mx.fast.rms_norm,
mx.fast.rope) are recorded as the several operations of their fallbacks, where CUDA has one node each: a step of ours
has one of them (the first layer's input norm), a draft step of the assistant several.

    python bench/studies/step_graph_nodes.py --random medium --json bench/results/cpu-step-graph-nodes-medium.json
    python bench/studies/step_graph_nodes.py --random medium --as-on-cuda --draft     (one node per fast operation
        too, as CUDA runs them; and one draft step of a random assistant beside the target's step)

On an H200 a 12B step is bound by the host handing its nodes over (bench/results/h200-decode-host-bound-x-ahead.log),
so fewer nodes a step is the lever; "medium" has the 12B's head sizes and layer pattern with 24 layers.
"""

import argparse
import collections
import io
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for random_model

import mlx.core as mx  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from mlx_gemma4 import attention, cache_writes, decode_attention, decoding, fused_norms, quantized_matvec  # noqa: E402
from mlx_gemma4.decode_step import decode_step  # noqa: E402
from random_model import build_random_assistant, build_random_model  # noqa: E402

# The modules that ask cuda_backend().
KERNEL_USERS = (attention, cache_writes, decode_attention, fused_norms, quantized_matvec)


def stand_in_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True, **options):
    """mx.fast.cuda_kernel's signature; each launch is one node that depends on every input."""
    def launch(inputs, output_shapes, output_dtypes, **launch_options):
        outputs = [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]
        return mx.depends(outputs, list(inputs))
    return launch


def one_node(output_shape, output_dtype, inputs: list) -> mx.array:
    return mx.depends([mx.zeros(output_shape, output_dtype)], inputs)[0]


def fast_operations_as_one_node():
    """MLX's fast operations as the one node each that CUDA runs, where the CPU records their fallbacks' several."""
    mx.fast.rms_norm = lambda x, weight, eps: one_node(x.shape, x.dtype, [x] + ([] if weight is None else [weight]))
    mx.fast.rope = lambda x, *args, **kwargs: one_node(
        x.shape, x.dtype, [x] + [kwargs[k] for k in ("offset", "freqs") if isinstance(kwargs.get(k), mx.array)])

    def dequantize(w, scales, biases=None, group_size=64, bits=4, **kwargs):
        shape = (*w.shape[:-1], w.shape[-1] * 32 // bits)
        return one_node(shape, scales.dtype, [w, scales] + ([] if biases is None else [biases]))
    mx.dequantize = dequantize


def on_cuda_path(enabled: bool):
    for module in KERNEL_USERS:
        module.cuda_backend = lambda: enabled


def step_graphs(shape: str, prompt_tokens: int, as_on_cuda: bool, with_draft: bool) -> dict:
    """{"step": DOT text of one compiled plain decoding step (sampling included) after a prompt of `prompt_tokens`,
    "draft": of one draft step of a random assistant there (with_draft)}."""
    mx.fast.cuda_kernel = stand_in_kernel
    model, config = build_random_model(shape, 4, 0)
    cache, sampler = model.make_cache(), make_sampler(0.0)
    on_cuda_path(False)  # the prompt through MLX's operations, evaluated for real
    token, _ = decoding.prefill(mx.arange(prompt_tokens) % 1000 + 10, model, cache, sampler, 2048, None, None)
    mx.eval(token)
    on_cuda_path(True)
    if as_on_cuda:
        fast_operations_as_one_node()
    graphs = {}
    if with_draft:
        from mlx_gemma4 import speculative

        drafter = build_random_assistant(config, 4)
        hidden = mx.zeros((1, 1, config["text_config"]["hidden_size"]), mx.bfloat16)
        with mx.stream(decoding.generation_stream):
            drafts, _ = speculative.draft(drafter, model.language_model.model.embed, token[:, None], hidden,
                                          speculative.store_caches(model, cache), mx.array([cache[0].offset]), 1, None)
        graphs["draft"] = dot_text(drafts[0])
    step = decode_step(model, cache)
    with mx.stream(decoding.generation_stream):
        graphs["step"] = dot_text(*decoding.sample_last(step(token[:, None]), sampler))
    return graphs


def dot_text(*outputs) -> str:
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return dot.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", default="medium", help="shape: tiny, small, medium, 12b")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--as-on-cuda", action="store_true",
                        help="MLX's fast operations (rms_norm, rope, dequantize) as one node each, as CUDA runs them")
    parser.add_argument("--draft", action="store_true", help="also one draft step of a random assistant")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = {"question": "How many nodes does a compiled decoding step hand MLX on the CUDA path, by kind?",
              "command": " ".join(["python", "bench/studies/step_graph_nodes.py", *(argv or sys.argv[1:])]),
              "shape": args.random, "prompt_tokens": args.prompt_tokens}
    for name, dot in step_graphs(args.random, args.prompt_tokens, args.as_on_cuda, args.draft).items():
        labels = re.findall(r'\{ \d+ \[label ="([^"]*)"', dot)
        kinds = collections.Counter(labels)
        figures = {"nodes": len(labels), "by_kind": dict(kinds.most_common())}
        if args.as_on_cuda:
            figures["kernels_and_fast_operations"] = kinds["Depends"]
        else:
            figures["our_kernels"] = kinds["Depends"]
        if name == "step":
            result.update(figures)
        else:
            result[name] = figures
        print(f"{name}: {len(labels)} nodes, {kinds['Depends']} of them stood in as one node each")
        for kind, count in kinds.most_common():
            print(f"{count:6d} {kind[:100]}")
    result["note"] = ("our CUDA kernels appear as Depends (one a launch); their stand-in zeros add Broadcast and Full "
                      "nodes that the real kernels do not have")
    if args.as_on_cuda:
        result["note"] += "; MLX's fast operations (rms_norm, rope, dequantize) appear as Depends too, one node each"
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
