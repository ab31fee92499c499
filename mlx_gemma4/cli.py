"""Command line: `mlx-gemma4 --model PATH_OR_ID --prompt "..."` (or `python -m mlx_gemma4`).

stdout carries only the generated text, streamed; statistics and notes (a reply cut short by the context) go to
stderr. Flags share mlx-lm's names and meanings; their values are checked before a model is loaded.
"""

import argparse
import json
import math
import sys

from .decoding import DEFAULT_MAX_TOKENS, DEFAULT_PREFILL_STEP_SIZE
from .draft_policy import MAX_DRAFT_TOKENS
from .errors import Gemma4Error, command_exit_code

PROGRAM = "mlx-gemma4"

# mlx-lm's default: short prompts keep a full-precision cache, which is small anyway.
DEFAULT_QUANTIZED_KV_START = 5000


class OneLineParser(argparse.ArgumentParser):
    """argparse prints a usage block on bad flags; a user needs only the reason."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def str2bool(text: str) -> bool:
    if text.lower() in ("true", "t", "yes", "1"):
        return True
    if text.lower() in ("false", "f", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def finite_float(text: str) -> float:
    """float() accepts nan and inf, which no sampling setting means (nan even changes the output silently)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROGRAM, description="Generate text with Gemma 4 on MLX.")
    parser.add_argument("--model", required=True, help="local folder or Hugging Face repo id")
    parser.add_argument("--prompt", "-p", required=True, help="the message to the model, or - to read stdin")
    parser.add_argument("--system-prompt", default=None, help="system message for the chat template")
    parser.add_argument("--image", action="append", default=[], help="image file (PNG, JPEG, WebP, GIF); repeatable")
    parser.add_argument("--audio", action="append", default=[], help="audio file (WAV, FLAC, OGG); repeatable")
    parser.add_argument("--video", default=None, help="video file (needs PyAV: pip install av)")
    parser.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS,
                        help="most tokens to generate (default: %(default)s; fewer if the context fills up)")
    parser.add_argument("--temp", type=finite_float, default=0.0,
                        help="sampling temperature; 0 is greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=finite_float, default=1.0,
                        help="nucleus sampling threshold; 0 or 1 keep all (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample from the k likeliest tokens; 0 keeps all (default: %(default)s)")
    parser.add_argument("--min-p", type=finite_float, default=0.0,
                        help="drop tokens below min_p x the top probability (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: none, a fresh draw)")
    parser.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as it is")
    parser.add_argument("--chat-template-config", default=None,
                        help='JSON options for the chat template, e.g. \'{"enable_thinking": true}\'')
    parser.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE,
                        help="prompt tokens processed per step (default: %(default)s)")
    parser.add_argument("--draft-model", default=None,
                        help="Gemma 4 assistant (folder or Hub id) for speculative decoding")
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help=f"draft tokens per target pass, 1 to {MAX_DRAFT_TOKENS} "
                             "(default: adapt to the acceptance rate)")
    add_kv_cache_arguments(parser)
    parser.add_argument("--prompt-cache-file", default=None,
                        help="continue from a prompt cache saved by python -m mlx_gemma4.cache_prompt")
    parser.add_argument("--verbose", type=str2bool, nargs="?", const=True, default=True,
                        help="print statistics to stderr (true) or only the response (false) (default: true)")
    return parser


def add_kv_cache_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--kv-bits", type=int, default=None,
                        help="quantize the KV cache to 4 or 8 bits (sliding-window layers too); default: no")
    parser.add_argument("--kv-group-size", type=int, default=64, help="group size for KV cache quantization")
    parser.add_argument("--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START,
                        help="with --kv-bits, quantize the cache once it holds this many tokens")


def kv_options(args) -> dict:
    """The KV quantization flags as stream_generate's options; bad values raise Gemma4Error."""
    from .kv_cache import kv_quantization

    kv_quantization(args.kv_bits, args.kv_group_size, args.quantized_kv_start)
    return dict(kv_bits=args.kv_bits, kv_group_size=args.kv_group_size, quantized_kv_start=args.quantized_kv_start)


def check_arguments(args) -> dict:
    """Range checks argparse cannot express; returns the chat template options."""
    if args.max_tokens < 1:
        raise Gemma4Error("--max-tokens must be at least 1")
    if args.prefill_step_size < 1:
        raise Gemma4Error("--prefill-step-size must be at least 1")
    if args.num_draft_tokens is not None and args.draft_model is None:
        raise Gemma4Error("--num-draft-tokens needs --draft-model")
    if args.num_draft_tokens is not None and not 1 <= args.num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise Gemma4Error(f"--num-draft-tokens must be between 1 and {MAX_DRAFT_TOKENS}")
    if args.prompt_cache_file and (args.image or args.audio or args.video or args.system_prompt is not None):
        raise Gemma4Error("with --prompt-cache-file, give media and the system prompt to cache_prompt instead")
    if args.temp < 0:
        raise Gemma4Error("--temp must be 0 or more")
    if not 0 <= args.top_p <= 1:
        raise Gemma4Error("--top-p must be in [0, 1]")
    if args.top_k < 0:
        raise Gemma4Error("--top-k must be 0 or more")
    if not 0 <= args.min_p <= 1:
        raise Gemma4Error("--min-p must be in [0, 1]")
    if args.chat_template_config is None:
        return {}
    return json_object_flag(args.chat_template_config, "--chat-template-config")


def json_object_flag(text: str, flag: str) -> dict:
    """A flag's value that must be a JSON object; anything else is our one-line error naming the flag."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise Gemma4Error(f"{flag} is not valid JSON: {error}") from None
    if not isinstance(options, dict):
        raise Gemma4Error(f"{flag} must be a JSON object")
    return options


def run(args) -> None:
    from .generation import stream_generate
    from .loading import load

    template_options = check_arguments(args)
    generation_options = kv_options(args)
    user_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, processor = load(args.model)
    draft_model, draft_statistics = None, None
    if args.draft_model is not None:
        from .drafter import check_compatible, load_drafter
        from .speculative import DraftStatistics

        draft_model, draft_statistics = load_drafter(args.draft_model), DraftStatistics()
        check_compatible(draft_model, model)
    if args.prompt_cache_file:
        from .prompt_cache_file import continuation_ids, load_prompt_cache

        prompt_cache, metadata = load_prompt_cache(args.prompt_cache_file, model, return_metadata=True)
        prompt = continuation_ids(processor, metadata, user_text, not args.ignore_chat_template, **template_options)
        generation_options["prompt_cache"] = prompt_cache
    elif args.ignore_chat_template:
        prompt = user_text
    else:
        prompt = processor.chat_prompt(user_text, args.system_prompt, images=len(args.image), audio=len(args.audio),
                                       videos=int(args.video is not None), **template_options)
    response = None
    for response in stream_generate(
        model, processor, prompt, max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, seed=args.seed, prefill_step_size=args.prefill_step_size,
        draft_model=draft_model, num_draft_tokens=args.num_draft_tokens, draft_statistics=draft_statistics,
        images=args.image, audio=args.audio, video=args.video, **generation_options,
    ):
        sys.stdout.write(response.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if response is not None and cut_short_by_context(response, args.max_tokens):
        context = response.prompt_tokens + response.generation_tokens
        print(f"note: the reply stopped after {response.generation_tokens} tokens because the model's context "
              f"({context} tokens) is full", file=sys.stderr)
    if args.verbose and response is not None:
        print_statistics(response)
        if draft_statistics is not None:
            print_draft_statistics(draft_statistics)


def cut_short_by_context(response, max_tokens: int) -> bool:
    """stream_generate clips max_tokens to what the context holds; the reply then ends on "length" early."""
    return response.finish_reason == "length" and response.generation_tokens < max_tokens


def print_statistics(response) -> None:
    print("==========", file=sys.stderr)
    print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec", file=sys.stderr)
    # The rate is measured from the first token on: one token alone has none.
    rate = f", {response.generation_tps:.3f} tokens-per-sec" if response.generation_tokens > 1 else ""
    print(f"Generation: {response.generation_tokens} tokens{rate}", file=sys.stderr)
    print(f"Time to first token: {response.time_to_first_token:.3f} s", file=sys.stderr)
    print(f"Peak memory: {response.peak_memory:.3f} GB", file=sys.stderr)


def print_draft_statistics(statistics) -> None:
    print(f"Draft: {statistics.accepted}/{statistics.drafted} draft tokens accepted "
          f"({100 * statistics.acceptance_rate:.1f}%), {statistics.accepted_per_pass:.2f} accepted per target pass "
          f"({statistics.tokens_per_pass:.2f} tokens per pass)", file=sys.stderr)


def main(argv=None) -> int:
    return command_exit_code(run, build_parser().parse_args(argv))

