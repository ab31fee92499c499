"""`python -m mlx_gemma4.server --model PATH_OR_ID`: flags named as mlx-lm's server names them where it has them."""

import argparse
import os
import sys
import threading

from ..errors import Gemma4Error
from ..cli import OneLineParser, json_object_flag
from ..decoding import DEFAULT_PREFILL_STEP_SIZE
from ..draft_policy import MAX_DRAFT_TOKENS
from .app import DEFAULT_MAX_TOKENS
from .engine import DEFAULT_MAX_QUEUED
from .media import DEFAULT_MAX_MEDIA_BYTES
from .prompt_cache_store import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES
from .security import DEFAULT_MAX_REQUEST_BYTES

API_KEY_VARIABLE = "MLX_GEMMA4_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m mlx_gemma4.server", description="OpenAI-compatible server for Gemma 4.")
    parser.add_argument("--model", required=True, help="local folder or Hugging Face repo id")
    parser.add_argument("--draft-model", default=None, help="Gemma 4 assistant for speculative decoding")
    parser.add_argument("--num-draft-tokens", type=int, default=None, help="fixed draft length (default: adaptive)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE),
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE}; none: open)")
    parser.add_argument("--allowed-origins", default="",
                        help="comma-separated origins for CORS (default: none, CORS off)")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="largest request body; larger ones get 413 unread")
    parser.add_argument("--max-media-bytes", type=int, default=DEFAULT_MAX_MEDIA_BYTES,
                        help="largest image, audio clip or video")
    parser.add_argument("--allow-local-media", action="store_true",
                        help="let clients name local files as media (off: only data: URLs)")
    parser.add_argument("--allow-remote-media", action="store_true",
                        help="let clients name http(s) URLs as media, fetched by the server (off by default: SSRF)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="default most tokens per reply")
    parser.add_argument("--temp", type=float, default=0.0, help="default sampling temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="default nucleus sampling threshold")
    parser.add_argument("--top-k", type=int, default=0, help="default top-k (0 keeps all)")
    parser.add_argument("--min-p", type=float, default=0.0, help="default min-p")
    parser.add_argument("--chat-template-args", default="{}",
                        help='JSON options for the chat template, e.g. \'{"enable_thinking": true}\'')
    parser.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE)
    parser.add_argument("--prompt-cache-size", type=int, default=DEFAULT_MAX_ENTRIES,
                        help="most conversation caches kept")
    parser.add_argument("--prompt-cache-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help="most bytes of conversation caches kept")
    parser.add_argument("--max-queued", type=int, default=DEFAULT_MAX_QUEUED,
                        help="requests waiting for the model before new ones get 503")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def check_arguments(args) -> dict:
    for name in ("max_tokens", "prefill_step_size", "prompt_cache_size", "max_queued", "max_request_bytes",
                 "max_media_bytes"):
        if getattr(args, name) < 1:
            raise Gemma4Error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.port < 65536:
        raise Gemma4Error("--port must be in 1..65535")
    if args.num_draft_tokens is not None:
        if args.draft_model is None:
            raise Gemma4Error("--num-draft-tokens needs --draft-model")
        if not 1 <= args.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise Gemma4Error(f"--num-draft-tokens must be between 1 and {MAX_DRAFT_TOKENS}")
    return json_object_flag(args.chat_template_args, "--chat-template-args")


def build_server(args, template_args: dict):
    from ..loading import load
    from .app import Server, ServerConfig
    from .engine import Engine
    from .media import MediaPolicy
    from .prompt_cache_store import PromptCacheStore

    model, processor = load(args.model)
    draft_model = None
    if args.draft_model is not None:
        from ..drafter import check_compatible, load_drafter

        draft_model = load_drafter(args.draft_model)
        check_compatible(draft_model, model)
    store = PromptCacheStore(model.make_cache, args.prompt_cache_size, args.prompt_cache_bytes)
    engine = Engine(model, processor, store, draft_model, args.max_queued, args.prefill_step_size,
                    num_draft_tokens=args.num_draft_tokens)
    config = ServerConfig(
        model_id=args.model, api_key=args.api_key or None,
        allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()],
        max_request_bytes=args.max_request_bytes,
        media=MediaPolicy(args.max_media_bytes, args.allow_local_media, args.allow_remote_media),
        max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        chat_template_args=template_args,
    )
    return Server(engine, config)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        template_args = check_arguments(args)
        server = build_server(args, template_args)
    except Gemma4Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    import uvicorn

    from .app import create_app

    # HTTP on a thread of its own; generation stays on this one, whose mlx streams the package made (engine.py).
    http = uvicorn.Server(uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level=args.log_level))
    threading.Thread(target=http.run, name="http", daemon=True).start()
    print(f"serving {args.model} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        server.engine.serve_forever()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
