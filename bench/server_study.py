"""The server against the library on the same model and prompts: decode speed through HTTP and SSE, time to first
token of a conversation's second turn (prompt cache) against its first, and JSON-schema decoding against free
decoding. Targets: server decode >= 0.95x the library's; second-turn TTFT <= 0.2x the first's at ~4K tokens;
JSON-schema decode >= 0.9x free decode.

A random model of bench/random_model.py's `small` shape (float32; the tiny test tokenizer, so the vocabulary is that
tokenizer's 389 entries), saved to a scratch folder and served by `python -m mlx_gemma4.server` in a subprocess on
loopback; clients are the official openai client. Speeds are measured by the client: tokens after the first over
the time from the first streamed chunk to the last. Runs alternate library and server, three of each.

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

REPEATS = 3
DECODE_TOKENS = 128
LONG_PROMPT_TOKENS = 4096
JSON_SCHEMA = {"type": "array", "minItems": 40, "maxItems": 40, "items": {"type": "string", "maxLength": 6}}


def save_model(folder: Path) -> dict:
    import random_model

    random_model.SHAPES["small_389"] = {**random_model.SHAPES["small"], "vocab_size": 389}
    model, config = random_model.build_random_model("small_389", 32)
    random_model.save_converted(model, config, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ROOT / "tests" / "data" / "tokenizer" / name, folder / name)
    return config


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


def timed_stream(stream) -> dict:
    """First-chunk time, last-chunk time and the completion tokens of a streamed request with usage."""
    start, first, last, tokens = time.perf_counter(), None, None, None
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            first = first or now
            last = now
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft": first - start, "decode_tps": (tokens - 1) / (last - first), "tokens": tokens}


def server_decode(client, ids: list) -> float:
    stream = client.completions.create(model="m", prompt=ids, max_tokens=DECODE_TOKENS, stream=True,
                                       stream_options={"include_usage": True})
    result = timed_stream(stream)
    assert result["tokens"] == DECODE_TOKENS
    return result["decode_tps"]


def chat_stream(client, messages: list, **options) -> dict:
    return timed_stream(client.chat.completions.create(model="m", messages=messages, stream=True,
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
        config = save_model(folder)
        model, processor = load(folder)
        ids = long_running_prompt(model, processor, 64)
        server = ServerProcess(folder, "--max-tokens", DECODE_TOKENS)
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
            library, served = [], []
            for _ in range(REPEATS):
                library.append(library_decode(model, processor, ids))
                served.append(server_decode(client, ids))
            words = "The quick brown fox jumps over the lazy dog. " * (LONG_PROMPT_TOKENS // 10)
            long_text = processor.tokenizer.decode(processor.encode(words)[: LONG_PROMPT_TOKENS - 32])
            first_turns, second_turns = [], []
            for run in range(REPEATS):
                messages = [{"role": "system", "content": f"Run {run}. {long_text}"},
                            {"role": "user", "content": "Summarise."}]
                first = chat_stream(client, messages, max_tokens=16)
                reply = client.chat.completions.create(model="m", messages=messages, max_tokens=16)
                messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                             {"role": "user", "content": "And the dog?"}]
                second = chat_stream(client, messages, max_tokens=16)
                first_turns.append(first["ttft"])
                second_turns.append(second["ttft"])
            prompt_tokens = reply.usage.prompt_tokens
            free, constrained = [], []
            question = [{"role": "user", "content": "List forty short words as JSON."}]
            for _ in range(REPEATS):
                free.append(chat_stream(client, question, max_tokens=DECODE_TOKENS)["decode_tps"])
                constrained.append(chat_stream(client, question, max_tokens=4 * DECODE_TOKENS, response_format={
                    "type": "json_schema", "json_schema": {"name": "words", "schema": JSON_SCHEMA}})["decode_tps"])
        finally:
            server.stop()
    ratio = lambda a, b: statistics.median(a) / statistics.median(b)  # noqa: E731
    results = {
        "machine": f"{platform.machine()} CPU (mlx cpu backend), shared 2-core machine",
        "model": {"shape": "small (bench/random_model.py) with a 389-token vocabulary", "dtype": "float32",
                  "layers": config["text_config"]["num_hidden_layers"], "hidden": config["hidden_size"]},
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
