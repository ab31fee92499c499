"""How many nodes does a compiled decoding step hand MLX, by kind, on the CUDA path? Counted on any machine: our CUDA
kernels are stood in for by one node each (zeros made to depend on the kernel's inputs, MLX's `Depends`), and the
step's graph is read with mx.export_to_dot, never evaluated. On the CPU, MLX's fast operations (mx.fast.rms_norm,
mx.fast.rope) are recorded as the several operations of their fallbacks, where CUDA has one node each: a step of ours
has one of them (the first layer's input norm), a draft step of the assistant several.

    python bench/studies/step_graph_nodes.py --random medium --json bench/results/cpu-step-graph-nodes-medium.json

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

from mlx_gemma4 import attention, decode_attention, decoding, fused_norms, quantized_matvec  # noqa: E402
from mlx_gemma4.decode_step import decode_step  # noqa: E402
from random_model import build_random_model  # noqa: E402

KERNEL_USERS = (attention, decode_attention, fused_norms, quantized_matvec)  # the modules that ask cuda_backend()


def stand_in_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True, **options):
    """mx.fast.cuda_kernel's signature; each launch is one node that depends on every input."""
    def launch(inputs, output_shapes, output_dtypes, **launch_options):
        outputs = [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]
        return mx.depends(outputs, list(inputs))
    return launch


def on_cuda_path(enabled: bool):
    for module in KERNEL_USERS:
        module.cuda_backend = lambda: enabled


def step_graph(shape: str, prompt_tokens: int) -> str:
    """The DOT text of one compiled plain decoding step (sampling included) after a prompt of `prompt_tokens`."""
    mx.fast.cuda_kernel = stand_in_kernel
    model, _ = build_random_model(shape, 4, 0)
    cache, sampler = model.make_cache(), make_sampler(0.0)
    on_cuda_path(False)  # the prompt through MLX's operations, evaluated for real
    token, _ = decoding.prefill(mx.arange(prompt_tokens) % 1000 + 10, model, cache, sampler, 2048, None, None)
    mx.eval(token)
    on_cuda_path(True)
    step = decode_step(model, cache)
    with mx.stream(decoding.generation_stream):
        next_token, logprobs = decoding.sample_last(step(token[:, None]), sampler)
    dot = io.StringIO()
    mx.export_to_dot(dot, next_token, logprobs)
    return dot.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", default="medium", help="shape: tiny, small, medium, 12b")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    labels = re.findall(r'\{ \d+ \[label ="([^"]*)"', step_graph(args.random, args.prompt_tokens))
    kinds = collections.Counter(labels)
    result = {"question": "How many nodes does a compiled decoding step hand MLX on the CUDA path, by kind?",
              "command": " ".join(["python", "bench/studies/step_graph_nodes.py", *(argv or sys.argv[1:])]),
              "shape": args.random, "prompt_tokens": args.prompt_tokens, "nodes": len(labels),
              "our_kernels": kinds["Depends"], "by_kind": dict(kinds.most_common()),
              "note": "our CUDA kernels appear as Depends (one a launch); their stand-in zeros add Broadcast and "
                      "Full nodes that the real kernels do not have"}
    print(f"{len(labels)} nodes, {kinds['Depends']} of them our kernels")
    for kind, count in kinds.most_common():
        print(f"{count:6d} {kind[:100]}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
