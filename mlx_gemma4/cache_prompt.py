"""Command line: `python -m mlx_gemma4.cache_prompt --model PATH_OR_ID --prompt "..." --prompt-cache-file F.safetensors`
prefills a long prompt (a document) once and saves the caches; `python -m mlx_gemma4 --model PATH_OR_ID
--prompt-cache-file F --prompt "question"` then continues from them, as many times as wanted, without prefilling the
document again.

As mlx-lm's cache_prompt does, the chat template is applied with the user's turn left open: the cached document and
each later question make one user message.
"""

import argparse
import sys
from pathlib import Path

from .decoding import DEFAULT_PREFILL_STEP_SIZE
from .errors import Gemma4Error, command_exit_code
from .cli import OneLineParser, add_kv_cache_arguments, kv_options


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m mlx_gemma4.cache_prompt",
                           description="Prefill a prompt once and save its KV cache for mlx-gemma4 "
                                       "--prompt-cache-file.")
    parser.add_argument("--model", required=True, help="local folder or Hugging Face repo id")
    parser.add_argument("--prompt", "-p", required=True, help="the text to cache (a document), or - to read stdin")
    parser.add_argument("--prompt-cache-file", required=True, help="the .safetensors file to write")
    parser.add_argument("--system-prompt", default=None, help="system message for the chat template")
    parser.add_argument("--ignore-chat-template", action="store_true", help="cache the prompt as it is")
    parser.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE,
                        help="prompt tokens processed per step")
    add_kv_cache_arguments(parser)
    return parser


def run(args):
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from .decoding import prefill, quantize_caches
    from .generation import context_length
    from .loading import load
    from .prompt_cache_file import OPEN_TURN_KEY, save_prompt_cache

    options = kv_options(args)
    if args.prefill_step_size < 1:
        raise Gemma4Error("--prefill-step-size must be at least 1")
    target = Path(args.prompt_cache_file)
    if target.suffix != ".safetensors":
        raise Gemma4Error(f"--prompt-cache-file must end in .safetensors: {target}")
    if target.exists():
        raise Gemma4Error(f"{target} exists; remove it or choose another name")
    user_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not user_text:
        raise Gemma4Error("the prompt is empty")
    model, processor = load(args.model)
    text = user_text if args.ignore_chat_template else processor.open_user_turn(user_text, args.system_prompt)
    ids = processor.encode(text)
    if len(ids) >= context_length(model):
        raise Gemma4Error(f"the prompt has {len(ids)} tokens; the model's context holds {context_length(model)}")
    cache = model.make_cache()
    quantize_caches(cache, **options)
    token, _ = prefill(mx.array(ids), model, cache, make_sampler(0.0), args.prefill_step_size)
    mx.eval(token, [c.arrays() for c in cache])
    save_prompt_cache(args.prompt_cache_file, cache, model,
                      {"model": str(args.model), OPEN_TURN_KEY: str(not args.ignore_chat_template).lower()})
    print(f"Cached {len(ids)} prompt tokens in {args.prompt_cache_file}; "
          f"peak memory {mx.get_peak_memory() / 1e9:.3f} GB", file=sys.stderr)


def main(argv=None) -> int:
    return command_exit_code(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
