"""The server against the library on the same model and prompts: decode speed through HTTP and SSE, time to first
token of a conversation's second turn (prompt cache) against its first, and JSON-schema decoding against free
decoding. Targets: server decode >= 0.95x the library's; second-turn TTFT <= 0.2x the first's at ~4K tokens;
JSON-schema decode >= 0.9x free decode.

A random model of the 12B's layer pattern at a CPU-sized shape (STUDY_SHAPE, float32; the tiny test tokenizer, so
the vocabulary is that tokenizer's 389 entries), saved to a scratch folder and served by `python -m
mlx_gemma4.server` in a subprocess on loopback; clients are the official openai client. (bench/random_model.py's
`small` shape decodes at ~100 ms a token and prefills 1K tokens in ~85 s on this shared 2-core CPU: too slow for a
4K conversation here.) Speeds are measured by the client: tokens after the first over
the time from the first streamed chunk to the last. Runs alternate library and server, five of each.

    python bench/server_study.py [--out bench/results/server-cpu-small.json]
"""

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

REPEATS = 5
LONG_REPEATS = 2
DECODE_TOKENS = 256
STUDY_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, global_head_dim=128, vocab_size=389, sliding_window=512)
LONG_PROMPT_TOKENS = 4096
JSON_SCHEMA = {"type": "array", "minItems": 40, "maxItems": 40, "items": {"type": "string", "maxLength": 6}}


def save_model(folder: Path):
    import random_model

    random_model.SHAPES["study"] = STUDY_SHAPE
    model, config = random_model.build_random_model("study", 32)
    random_model.save_converted(model, config, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ROOT / "tests" / "data" / "tokenizer" / name, folder / name)


def long_running_prompt(model, processor, length: int) -> list:
    """Token ids of a prompt whose greedy reply runs DECODE_TOKENS tokens without a stop token."""
    from mlx_gemma4.generation import stream_generate

    words = "The quick brown fox jumps over the lazy dog and runs on Apple Silicon with MLX ".split()
    for shift in range(len(words)):
        text = " ".join((words[shift:] + words[:shift]) * (length // len(words) + 1))
        ids = processor.encode(text)[:length]
        responses = list(stream_generate(model, processor, ids, max_tokens=DECODE_TOKENS))
        if len(responses) == DECODE_TOKENS:
            return ids
    raise RuntimeError("every prompt's greedy reply stops early; pick other words")


def library_decode(model, processor, ids: list) -> float:
    from mlx_gemma4.generation import stream_generate

    response = None
    for response in stream_generate(model, processor, ids, max_tokens=DECODE_TOKENS):
        pass
    assert response.generation_tokens == DECODE_TOKENS
    return response.generation_tps


def timed_stream(start_request) -> dict:
    """Time from sending to the first chunk (sent once the first token exists), decode speed from the first chunk
    to the last, the completion tokens and the streamed text of `start_request()`, a streamed request with usage."""
    start = time.perf_counter()
    stream = start_request()
    first, last, tokens, text = None, None, None, []
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            first = first or now
            last = now
            delta = chunk.choices[0]
            text.append(getattr(delta, "text", None) or getattr(getattr(delta, "delta", None), "content", None) or "")
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft": first - start, "decode_tps": (tokens - 1) / (last - first), "tokens": tokens,
            "text": "".join(text)}


def progress(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def server_decode(client, ids: list) -> float:
    result = timed_stream(lambda: client.completions.create(model="m", prompt=ids, max_tokens=DECODE_TOKENS,
                                                            stream=True, stream_options={"include_usage": True}))
    assert result["tokens"] == DECODE_TOKENS
    return result["decode_tps"]


def chat_stream(client, messages: list, **options) -> dict:
    return timed_stream(lambda: client.chat.completions.create(model="m", messages=messages, stream=True,
                                                               stream_options={"include_usage": True}, **options))


def spread(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    import openai

    from mlx_gemma4.loading import load
    from server_fixtures import ServerProcess

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        save_model(folder)
        model, processor = load(folder)
        ids = long_running_prompt(model, processor, 64)
        server = ServerProcess(folder, "--max-tokens", DECODE_TOKENS)
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
            library, served = [], []
            for _ in range(REPEATS):
                library.append(library_decode(model, processor, ids))
                served.append(server_decode(client, ids))
                progress(f"decode: library {library[-1]:.1f} tok/s, server {served[-1]:.1f} tok/s")
            words = "The quick brown fox jumps over the lazy dog. " * (LONG_PROMPT_TOKENS // 10)
            long_text = processor.tokenizer.decode(processor.encode(words)[: LONG_PROMPT_TOKENS - 32])
            first_turns, second_turns = [], []
            progress("decode done; conversations")
            for run in range(LONG_REPEATS):
                messages = [{"role": "system", "content": f"Run {run}. {long_text}"},
                            {"role": "user", "content": "Summarise."}]
                first = chat_stream(client, messages, max_tokens=16)
                messages += [{"role": "assistant", "content": first["text"]},
                             {"role": "user", "content": "And the dog?"}]
                second = chat_stream(client, messages, max_tokens=16)
                first_turns.append(first["ttft"])
                second_turns.append(second["ttft"])
                progress(f"conversation {run}: {first['ttft']:.2f} s then {second['ttft']:.2f} s")
            prompt_tokens = len(processor.encode(processor.apply_chat_template(messages[:2])))
            free, constrained = [], []
            question = [{"role": "user", "content": "List forty short words as JSON."}]
            for _ in range(REPEATS):
                free.append(chat_stream(client, question, max_tokens=DECODE_TOKENS)["decode_tps"])
                constrained.append(chat_stream(client, question, max_tokens=4 * DECODE_TOKENS, response_format={
                    "type": "json_schema", "json_schema": {"name": "words", "schema": JSON_SCHEMA}})["decode_tps"])
                progress(f"free {free[-1]:.1f} tok/s, json schema {constrained[-1]:.1f} tok/s")
        finally:
            server.stop()
    ratio = lambda a, b: statistics.median(a) / statistics.median(b)  # noqa: E731
    results = {
        "machine": f"{platform.machine()} CPU (mlx cpu backend), shared 2-core machine",
        "model": {"shape": STUDY_SHAPE, "dtype": "float32"},
        "decode": {"tokens": DECODE_TOKENS, "library_tps": spread(library), "server_tps": spread(served),
                   "server_over_library": ratio(served, library), "target": ">= 0.95"},
        "second_turn_ttft": {"first_turn_prompt_tokens": prompt_tokens, "first_turn_s": spread(first_turns),
                             "second_turn_s": spread(second_turns),
                             "second_over_first": ratio(second_turns, first_turns), "target": "<= 0.2"},
        "json_schema_decode": {"free_tps": spread(free), "json_schema_tps": spread(constrained),
                               "json_over_free": ratio(constrained, free), "target": ">= 0.9"},
    }
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
