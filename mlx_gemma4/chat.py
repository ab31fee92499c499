"""`python -m mlx_gemma4.chat --model PATH_OR_ID`: a conversation in the terminal, as mlx-lm's chat. Each turn
prefills only what it adds: the history stays in the prompt cache (the server's store and engine, run here).
`--image`/`--audio` go with the first turn; `/reset` starts over; `/exit` or end of input leaves."""

import argparse
import sys
from pathlib import Path

from .decoding import DEFAULT_MAX_TOKENS, DEFAULT_PREFILL_STEP_SIZE
from .errors import Gemma4Error, command_exit_code
from .cli import OneLineParser, check_arguments

RESET, EXIT = "/reset", "/exit"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m mlx_gemma4.chat", description="Chat with Gemma 4 in the terminal.")
    parser.add_argument("--model", required=True, help="local folder or Hugging Face repo id")
    parser.add_argument("--draft-model", default=None, help="Gemma 4 assistant for speculative decoding")
    parser.add_argument("--num-draft-tokens", type=int, default=None, help="fixed draft length (default: adaptive)")
    parser.add_argument("--system-prompt", default=None, help="system message")
    parser.add_argument("--image", action="append", default=[], help="image for the first turn; repeatable")
    parser.add_argument("--audio", action="append", default=[], help="audio clip for the first turn; repeatable")
    parser.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS, help="most tokens per reply")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat-template-config", default=None,
                        help='JSON options for the chat template, e.g. \'{"enable_thinking": true}\'')
    parser.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE,
                        help="prompt tokens processed per step")
    # What cli.check_arguments also reads, for flags a chat does not have.
    parser.set_defaults(video=None, prompt_cache_file=None)
    return parser


def read_media(paths: list) -> list:
    try:
        return [Path(path).read_bytes() for path in paths]
    except OSError as error:
        raise Gemma4Error(f"cannot read {error.filename}: {error.strerror}") from None


def first_user_message(text: str, images: int, audio: int) -> dict:
    if not (images or audio):
        return {"role": "user", "content": text}
    parts = [{"type": "image"}] * images + [{"type": "audio"}] * audio + [{"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def run(args, read_line=input, write=sys.stdout.write) -> None:
    from .loading import load
    from .server.chat_format import ReplyParser
    from .server.engine import Engine, Failed, Job, Piece, Settings, build_prompt
    from .server.prompt_cache_store import PromptCacheStore

    template_options = check_arguments(args)
    media = {"images": read_media(args.image), "audio": read_media(args.audio), "video": None}
    model, processor = load(args.model)
    draft_model = None
    if args.draft_model is not None:
        from .drafter import check_compatible, load_drafter

        draft_model = load_drafter(args.draft_model)
        check_compatible(draft_model, model)
    engine = Engine(model, processor, PromptCacheStore(model.make_cache, max_entries=2), draft_model,
                    prefill_step_size=args.prefill_step_size, num_draft_tokens=args.num_draft_tokens)
    settings = Settings(max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, top_k=args.top_k,
                        min_p=args.min_p, seed=args.seed)
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages = list(system)
    while True:
        try:
            text = read_line(">> ")
        except EOFError:
            return
        if text.strip() == EXIT:
            return
        if text.strip() == RESET:
            messages, media = list(system), {"images": [], "audio": [], "video": None}
            engine.store.clear()
            continue
        if len(messages) == len(system):
            user = first_user_message(text, len(media["images"]), len(media["audio"]))
        else:
            user = {"role": "user", "content": text}
        prompt_text = processor.apply_chat_template(messages + [user], **template_options)
        events = []

        def show(event):
            events.append(event)
            if isinstance(event, Piece):
                write(event.text)
                sys.stdout.flush()

        # The first turn's media stay in the history, so every later prompt carries them too.
        engine.serve_one(Job(lambda: build_prompt(model, processor, prompt_text, media), settings, show))
        write("\n")
        failure = next((event for event in events if isinstance(event, Failed)), None)
        if failure is not None:
            print(f"error: {failure.message}", file=sys.stderr)
            continue
        reply = "".join(event.text for event in events if isinstance(event, Piece))
        messages += [user, {"role": "assistant", "content": ReplyParser().feed(reply, final=True).content}]


def main(argv=None) -> int:
    return command_exit_code(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
