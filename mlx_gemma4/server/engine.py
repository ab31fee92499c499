"""One generation at a time, on one thread, fed by a bounded queue: requests are never mixed, a full queue is refused
at once, and a request whose client left is dropped (waiting) or stopped at its next token (running). That thread is
the one that imported the package: mlx streams belong to the thread that made them, generation's stream included.

A job's prompt is prefilled on the cached prefix the PromptCacheStore finds, but for its last token, which
stream_generate then takes: a copy of the caches at the prompt's end goes back to the store first, so the next turn
of this conversation finds the prompt even when the reply's re-tokenized text differs from the tokens generated."""

import hashlib
import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from ..errors import Gemma4Error
from ..decoding import DEFAULT_PREFILL_STEP_SIZE, chunk_forward, evaluate_chunks, generation_stream, prefill_chunks
from ..memory_bound import PREFILL_TRANSIENT_BYTES, transient_memory_bound
from ..generation import stream_generate
from .prompt_cache_store import PromptCacheStore, snapshot

DEFAULT_MAX_QUEUED = 16


class QueueFull(Exception):
    pass


@dataclass
class Prompt:
    """What the model reads: token ids, the keys the cache store matches them by, and for media prompts their
    embeddings and vision blocks."""

    ids: list
    keys: list
    embeddings: Optional[mx.array] = None
    block_ids: Optional[mx.array] = None


@dataclass
class Settings:
    max_tokens: int
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop_strings: list = field(default_factory=list)
    stop_token_ids: set = field(default_factory=set)  # beyond the processor's own (e.g. <|tool_response>)
    top_logprobs: Optional[int] = None  # None: no logprobs; 0: the chosen token's only
    make_sampler: Optional[Callable] = None  # grammar-constrained decoding; never with the drafter


@dataclass
class Piece:
    text: str
    token: Optional[int] = None
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None  # [(token, logprob)]


@dataclass
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    message: str
    user_error: bool


@dataclass
class Job:
    prepare: Callable  # () -> Prompt; run on the worker, where all mlx work happens (media embedding included)
    settings: Settings
    send: Callable  # called from the worker thread with Piece, Finished or Failed
    cancelled: threading.Event = field(default_factory=threading.Event)


def media_keys(ids: list, config, media: dict) -> list:
    """`ids` with each media run's placeholder tokens standing for the item's digest: a run of image (or audio)
    placeholders is the next image (or clip); every video placeholder belongs to the one video."""
    digests = {config.image_token_id: [digest(item) for item in media.get("images") or []],
               config.audio_token_id: [digest(item) for item in media.get("audio") or []]}
    video = media.get("video")
    keys, runs, previous = [], {kind: -1 for kind in digests}, None
    for token in ids:
        if token in digests:
            if token != previous:
                runs[token] += 1
            keys.append(("media", digests[token][runs[token]]))
        elif token == config.video_token_id and video is not None:
            keys.append(("media", digest(video)))
        else:
            keys.append(token)
        previous = token
    return keys


def digest(item: bytes) -> str:
    return hashlib.sha256(item).hexdigest()


def build_prompt(model, processor, text: str, media: dict) -> Prompt:
    """The Prompt for chat-formatted `text` holding one placeholder per item of `media` ({"images": [bytes],
    "audio": [bytes], "video": bytes or None}); mlx work, so on the generation thread."""
    if not (media.get("images") or media.get("audio") or media.get("video") is not None):
        ids = processor.encode(text)
        return Prompt(ids, list(ids))
    from ..multimodal import media_prompt

    ids, inputs = media_prompt(model, processor, text, media.get("images") or None, media.get("audio") or None,
                               media.get("video"))
    return Prompt(ids, media_keys(ids, model.config, media), inputs["input_embeddings"], inputs["block_ids"])


class Engine:
    def __init__(self, model, processor, store: PromptCacheStore, draft_model=None,
                 max_queued: int = DEFAULT_MAX_QUEUED, prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
                 num_draft_tokens: Optional[int] = None):
        self.model = model
        self.processor = processor
        self.store = store
        self.draft_model = draft_model
        self.prefill_step_size = prefill_step_size
        self.num_draft_tokens = num_draft_tokens
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queued)

    def submit(self, job: Job):
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def serve_forever(self):
        while True:
            self.serve_one(self.jobs.get())

    def serve_one(self, job: Job):
        if job.cancelled.is_set():
            return
        try:
            self.run(job)
        except Gemma4Error as error:
            job.send(Failed(str(error), user_error=True))
        except Exception as error:  # one failing request must never stop the server
            traceback.print_exc()
            job.send(Failed(f"generation failed: {type(error).__name__}", user_error=False))

    def prefill(self, cache: list, prompt: Prompt, start: int, end: int):
        blocks = None if prompt.block_ids is None else prompt.block_ids[:, start:end]
        embeddings = None if prompt.embeddings is None else prompt.embeddings[:, start:end]
        forward = chunk_forward(self.model, cache, mx.array(prompt.ids[start:end]), embeddings, blocks)
        with mx.stream(generation_stream), transient_memory_bound(PREFILL_TRANSIENT_BYTES) as bound:
            chunks = prefill_chunks(end - start, self.prefill_step_size, blocks)
            evaluate_chunks(forward, chunks, cache, end - start, bound)

    def run(self, job: Job):
        prompt, settings = job.prepare(), job.settings
        cache, reused = self.store.take(prompt.keys)
        last = len(prompt.ids) - 1
        self.prefill(cache, prompt, reused, last)
        self.store.put(prompt.keys[:last], snapshot(cache))
        sampler = settings.make_sampler() if settings.make_sampler else None
        drafter = self.draft_model if sampler is None else None
        emitted, text = [], StopStringFilter(settings.stop_strings)
        finish_reason = None
        try:
            for response in stream_generate(
                self.model, self.processor, prompt.ids[last:], max_tokens=settings.max_tokens, temp=settings.temp,
                top_p=settings.top_p, top_k=settings.top_k, min_p=settings.min_p, seed=settings.seed,
                sampler=sampler, prefill_step_size=self.prefill_step_size, prompt_cache=cache, draft_model=drafter,
                num_draft_tokens=self.num_draft_tokens if drafter is not None else None,
            ):
                emitted.append(response.token)
                if job.cancelled.is_set():
                    finish_reason = "cancelled"
                    break
                ended = response.finish_reason or (response.token in settings.stop_token_ids and "stop")
                piece, stopped = text.feed(response.text, final=bool(ended))
                if piece or settings.top_logprobs is not None:
                    job.send(self.piece(piece, response, settings.top_logprobs))
                if stopped:
                    finish_reason = "stop"
                    break
                if ended:
                    finish_reason = ended
                    break
        finally:
            # The store takes the cache back only if it holds exactly prompt + emitted tokens (see put).
            self.store.put(prompt.keys + emitted, cache)
        if finish_reason != "cancelled":
            job.send(Finished(finish_reason or "length", len(prompt.ids), len(emitted), reused))

    @staticmethod
    def piece(text: str, response, top_logprobs: Optional[int]) -> Piece:
        if top_logprobs is None:
            return Piece(text, response.token)
        logprobs = response.logprobs.reshape(-1)
        top = []
        if top_logprobs:
            indices = mx.argpartition(-logprobs, top_logprobs - 1)[:top_logprobs]
            values = logprobs[indices]
            top = sorted(zip(indices.tolist(), values.tolist()), key=lambda pair: -pair[1])
        return Piece(text, response.token, logprobs[response.token].item(), top)


class StopStringFilter:
    """Passes text on, holding back what could be the start of a stop string; at a stop string, cuts there."""

    def __init__(self, stop_strings: list):
        self.stop_strings = stop_strings
        self.pending = ""

    def feed(self, text: str, final: bool) -> tuple:
        """(text to hand out, whether a stop string was reached)."""
        if not self.stop_strings:
            return text, False
        self.pending += text
        found = [index for index in (self.pending.find(s) for s in self.stop_strings) if index >= 0]
        if found:
            out, self.pending = self.pending[: min(found)], ""
            return out, True
        keep = 0 if final else max(len(s) - 1 for s in self.stop_strings)
        keep = min(keep, len(self.pending))
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out, False
