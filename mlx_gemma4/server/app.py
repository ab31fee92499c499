"""The routes: each turns an OpenAI request into a job for the engine and the engine's pieces into OpenAI JSON or
server-sent events. Errors a client can cause come back as 4xx with OpenAI's error object, never a traceback."""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import Gemma4Error
from ..generation import prompt_ids
from ..processor import END_OF_TURN_TOKEN
from .chat_format import (TOOL_RESPONSE_START, ReplyParser, forced_tool_grammar, render_chat,
                          template_options)
from .engine import Engine, Failed, Finished, Job, Piece, Prompt, QueueFull, Settings, build_prompt
from .media import MediaPolicy, message_media
from .schema import ChatCompletionRequest, CompletionRequest, error_body
from .security import DEFAULT_MAX_REQUEST_BYTES, Gatekeeper

DEFAULT_MAX_TOKENS = 512


@dataclass
class ServerConfig:
    model_id: str
    api_key: Optional[str] = None
    allowed_origins: list = field(default_factory=list)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    media: MediaPolicy = MediaPolicy()
    max_tokens: int = DEFAULT_MAX_TOKENS
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    chat_template_args: dict = field(default_factory=dict)


class Server:
    """The loaded model and what the routes share."""

    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.processor = engine.processor
        self.created = int(time.time())

    def token_id(self, text: str) -> Optional[int]:
        return self.processor.tokenizer.get_vocab().get(text)

    @cached_property
    def grammar_tokenizer(self):
        from .constrained import GrammarTokenizer

        end = self.token_id(END_OF_TURN_TOKEN)
        return GrammarTokenizer(self.processor, end if end is not None else min(self.processor.stop_token_ids))

    def constrained_sampler_factory(self, grammar: str, temp: float, top_p: float, top_k: int, min_p: float):
        from mlx_lm.sample_utils import make_sampler

        from .constrained import ConstrainedSampler

        tokenizer = self.grammar_tokenizer
        ConstrainedSampler(tokenizer, grammar, None)  # a bad grammar is refused now, not on the worker
        return lambda: ConstrainedSampler(tokenizer, grammar, make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k))

    def settings(self, request, max_tokens: Optional[int], top_logprobs: Optional[int], grammar: Optional[str],
                 extra_stops: set) -> Settings:
        config = self.config
        temp = config.temp if request.temperature is None else request.temperature
        top_p = config.top_p if request.top_p is None else request.top_p
        top_k = config.top_k if request.top_k is None else request.top_k
        min_p = config.min_p if request.min_p is None else request.min_p
        return Settings(
            max_tokens=max_tokens or config.max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
            seed=request.seed, stop_strings=request.stop_strings(), stop_token_ids=extra_stops,
            top_logprobs=top_logprobs,
            make_sampler=self.constrained_sampler_factory(grammar, temp, top_p, top_k, min_p) if grammar else None,
        )

    def text_prompt(self, text_or_ids) -> Prompt:
        ids = prompt_ids(self.processor, text_or_ids, self.processor.config.text_config.vocab_size)
        return Prompt(ids, list(ids))

    def chat_prompt(self, text: str, media: dict) -> Prompt:
        return build_prompt(self.engine.model, self.processor, text, media)

    def checked(self, prompt: Prompt) -> Prompt:
        limit = self.engine.model.config.text_config.max_position_embeddings
        if len(prompt.ids) >= limit:
            raise Gemma4Error(f"the prompt has {len(prompt.ids)} tokens; the model's context holds {limit}")
        return prompt


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: Optional[str] = None):
    return JSONResponse(error_body(message, kind, code=code), status_code=status)


async def run_job(server: Server, request: Request, job: Job):
    """Queues `job`; returns (asyncio queue of its events, its first event), or an error response."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job.send = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    try:
        server.engine.submit(job)
    except QueueFull:
        return None, error_response(503, "the server is busy: too many queued requests; retry later",
                                    "server_error", "overloaded")
    first = await first_event(events, request, job)
    if first is None:
        return None, error_response(499, "client disconnected")
    if isinstance(first, Failed):
        status = 400 if first.user_error else 500
        return None, error_response(status, first.message, "invalid_request_error" if first.user_error
                                    else "server_error")
    return events, first


async def first_event(events: asyncio.Queue, request: Request, job: Job):
    """Waits for the job's first event, dropping the job if its client goes away while it waits."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                return None


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def token_logprob(server: Server, token: int, logprob: float) -> dict:
    text = server.processor.tokenizer.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(server: Server, piece: Piece) -> dict:
    entry = token_logprob(server, piece.token, piece.logprob)
    entry["top_logprobs"] = [token_logprob(server, token, value) for token, value in piece.top_logprobs or []]
    return entry


def chat_job(server: Server, body: ChatCompletionRequest) -> Job:
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    tool_choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
    options = {**server.config.chat_template_args, **template_options(body.chat_template_kwargs,
                                                                      body.reasoning_effort)}
    text = render_chat(server.processor, body.messages, tools, tool_choice, options)
    media = message_media(body.messages, server.config.media)
    grammar = forced_tool_grammar(tools, tool_choice, server.token_id)
    if body.response_format is not None and body.response_format.type != "text" and grammar is None:
        from .constrained import json_grammar

        schema = body.response_format.json_schema.schema_ if body.response_format.json_schema else None
        grammar = json_grammar(schema)
    # A reply ends where the caller's tool result would go (with or without tools: nothing after it is content).
    extra_stops = {server.token_id(TOOL_RESPONSE_START)} - {None}
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    settings = server.settings(body, body.token_limit(), top_logprobs, grammar, extra_stops)
    return Job(lambda: server.checked(server.chat_prompt(text, media)), settings, send=None)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="mlx-gemma4", docs_url=None, redoc_url=None, openapi_url=None)
    if server.config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=server.config.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Gatekeeper, api_key=server.config.api_key, max_request_bytes=server.config.max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = first.get("msg", "invalid request")
        return error_response(400, f"{where}: {message}" if where else message)

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Gemma4Error)
    async def user_error(_, error: Gemma4Error):
        return error_response(400, str(error))

    @app.exception_handler(Exception)
    async def internal_error(_, error: Exception):
        return error_response(500, f"internal error: {type(error).__name__}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.config.model_id, "object": "model",
                                            "created": server.created, "owned_by": "mlx-gemma4"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        # Rendering, base64 decoding and grammar compiling take a while for large requests: off the event loop.
        job = await run_in_threadpool(chat_job, server, body)
        events, first = await run_job(server, request, job)
        if events is None:
            return first
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_chat(server, job, events, first, response_id, created, include_usage),
                                     media_type="text/event-stream")
        return await complete_chat(server, events, first, response_id, created, body.logprobs)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        top_logprobs = body.logprobs
        settings = server.settings(body, body.max_tokens, top_logprobs, None, set())
        job = Job(lambda: server.checked(server.text_prompt(body.prompt)), settings, send=None)
        events, first = await run_job(server, request, job)
        if events is None:
            return first
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_text(server, job, events, first, response_id, created, include_usage),
                                     media_type="text/event-stream")
        pieces, done = await collect(events, first)
        choice = {"index": 0, "text": "".join(p.text for p in pieces), "finish_reason": done.finish_reason,
                  "logprobs": text_logprobs(server, pieces) if top_logprobs is not None else None}
        return {"id": response_id, "object": "text_completion", "created": created, "model": server.config.model_id,
                "choices": [choice], "usage": usage(done)}

    return app


async def events_of(events: asyncio.Queue, first):
    event = first
    while True:
        if isinstance(event, Failed):
            raise RuntimeError(event.message)
        yield event
        if isinstance(event, Finished):
            return
        event = await events.get()


async def collect(events: asyncio.Queue, first) -> tuple:
    pieces = []
    async for event in events_of(events, first):
        if isinstance(event, Piece):
            pieces.append(event)
        else:
            return pieces, event


def text_logprobs(server: Server, pieces: list) -> dict:
    decode = server.processor.tokenizer.decode
    return {"tokens": [decode([p.token]) for p in pieces], "token_logprobs": [p.logprob for p in pieces],
            "top_logprobs": [{decode([t]): v for t, v in p.top_logprobs or []} for p in pieces],
            "text_offset": []}


def finish_reason(done: Finished, tool_calls: list) -> str:
    return "tool_calls" if tool_calls else done.finish_reason


async def complete_chat(server: Server, events, first, response_id: str, created: int, logprobs: bool):
    pieces, done = await collect(events, first)
    parser = ReplyParser()
    reply = parser.feed("".join(p.text for p in pieces), final=True)
    message = {"role": "assistant", "content": reply.content if reply.content or not reply.tool_calls else None}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    choice = {"index": 0, "message": message, "finish_reason": finish_reason(done, reply.tool_calls),
              "logprobs": {"content": [chat_logprobs(server, p) for p in pieces]} if logprobs else None}
    return {"id": response_id, "object": "chat.completion", "created": created, "model": server.config.model_id,
            "choices": [choice], "usage": usage(done)}


async def stream_chat(server: Server, job: Job, events, first, response_id: str, created: int, include_usage: bool):
    def chunk(delta: dict, reason: Optional[str] = None, logprobs: Optional[list] = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": reason,
                  "logprobs": {"content": logprobs} if logprobs is not None else None}
        return sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                    "model": server.config.model_id, "choices": [choice]})

    parser, calls = ReplyParser(), 0
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in events_of(events, first):
            if isinstance(event, Finished):
                done = event
                break
            reply = parser.feed(event.text)
            logprobs = [chat_logprobs(server, event)] if event.logprob is not None else None
            if reply.reasoning:
                yield chunk({"reasoning_content": reply.reasoning}, logprobs=logprobs)
                logprobs = None
            if reply.content or logprobs:
                yield chunk({"content": reply.content}, logprobs=logprobs)
            for call in reply.tool_calls:
                yield chunk({"tool_calls": [{"index": calls, **call}]})
                calls += 1
        rest = parser.feed("", final=True)
        if rest.reasoning:
            yield chunk({"reasoning_content": rest.reasoning})
        if rest.content:
            yield chunk({"content": rest.content})
        yield chunk({}, "tool_calls" if calls else done.finish_reason)
        if include_usage:
            yield sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                       "model": server.config.model_id, "choices": [], "usage": usage(done)})
        yield "data: [DONE]\n\n"
    except RuntimeError as error:  # the generation failed after the stream began: say so in the stream
        yield sse(error_body(str(error), "server_error"))
    finally:
        job.cancelled.set()  # a client that left stops its generation at the next token


async def stream_text(server: Server, job: Job, events, first, response_id: str, created: int, include_usage: bool):
    def chunk(text: str, reason: Optional[str] = None) -> str:
        return sse({"id": response_id, "object": "text_completion", "created": created,
                    "model": server.config.model_id,
                    "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]})

    try:
        async for event in events_of(events, first):
            if isinstance(event, Finished):
                yield chunk("", event.finish_reason)
                if include_usage:
                    yield sse({"id": response_id, "object": "text_completion", "created": created,
                               "model": server.config.model_id, "choices": [], "usage": usage(event)})
                break
            if event.text:
                yield chunk(event.text)
        yield "data: [DONE]\n\n"
    except RuntimeError as error:
        yield sse(error_body(str(error), "server_error"))
    finally:
        job.cancelled.set()
