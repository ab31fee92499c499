"""The cost of one token's grammar mask at Gemma 4's vocabulary size (262,144), for the engines the server could
use for JSON-schema decoding: llguidance and xgrammar. The server masks every step of a constrained reply, so this
cost is paid per token on the host while the accelerator waits.

No Gemma tokenizer can be downloaded here, so the vocabulary is synthetic but shaped like one: the 256 byte-fallback
tokens, Gemma's specials, then SentencePiece-style pieces (words and word starts with and without the ▁ space
marker, numbers, punctuation runs, CJK characters) up to 262,144 entries. Each engine walks the same token sequence of
a valid document per schema, timing the mask at every step and then taking the longest token that the mask allows
and that continues the document (an engine may force canonical tokens where the grammar fixes the next bytes).

    python bench/grammar_mask_cost.py [--out bench/results/grammar-mask-cost.json]
"""

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

VOCAB_SIZE = 262_144
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|channel>", "<channel|>",
            "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']
SCHEMAS = {
    "person": ({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "email": {"type": "string"},
        "admin": {"type": "boolean"}}, "required": ["name", "age", "email", "admin"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "admin": True}),
    "order": ({"type": "object", "properties": {
        "id": {"type": "string"}, "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "quantity": {"type": "integer"}, "price": {"type": "number"}},
            "required": ["sku", "quantity", "price"]}},
        "status": {"enum": ["open", "paid", "shipped"]}}, "required": ["id", "items", "status"]},
        {"id": "A-1093", "items": [{"sku": "pen", "quantity": 3, "price": 1.25},
                                   {"sku": "notebook", "quantity": 1, "price": 4.5}], "status": "paid"}),
    "any_object": ({"type": "object"},
                   {"query": "weather in Paris", "limit": 5, "filters": {"units": "metric", "days": [1, 2, 3]}}),
}


def synthetic_vocabulary() -> list:
    words = set()
    for path in list(Path(np.__file__).parent.rglob("*.py"))[:400]:
        words.update(re.findall(r"[A-Za-z]{2,14}", path.read_text(errors="ignore")))
    words = sorted(words)
    pieces = list(SPECIALS) + [f"<0x{b:02X}>" for b in range(256)]
    seen = set(pieces)

    def add(piece: str):
        if piece and piece not in seen and len(pieces) < VOCAB_SIZE:
            seen.add(piece)
            pieces.append(piece)

    for word in words:
        for form in (word, word.lower(), word.capitalize()):
            add(form)
            add("▁" + form)
    for number in range(10_000):
        add(str(number))
        add("▁" + str(number))
    punctuation = list("{}[]()<>:;,.!?\"'`~@#$%^&*-_=+|\\/")
    for first in punctuation:
        add(first)
        for second in punctuation:
            add(first + second)
            add("▁" + first + second)
    for code in range(0x4E00, 0x9FFF):
        add(chr(code))
    for word in words:  # word starts and ends, as BPE leaves them
        for end in range(2, len(word)):
            add(word[:end])
            add("▁" + word[:end])
            add(word[len(word) - end:])
    for first in range(0x4E00, 0x9FFF):  # then CJK pairs until the vocabulary is full
        for second in range(0x4E00, 0x4E00 + 64):
            add(chr(first) + chr(second))
    assert len(pieces) == VOCAB_SIZE, len(pieces)
    return pieces


def hf_tokenizer(pieces: list):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(vocab={piece: i for i, piece in enumerate(pieces)}, merges=[],
                                     unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", additional_special_tokens=SPECIALS[5:])


def summary(times: list) -> dict:
    ordered = sorted(times)
    return {"steps": len(times), "median_ms": 1e3 * statistics.median(times), "mean_ms": 1e3 * statistics.fmean(times),
            "p90_ms": 1e3 * ordered[int(0.9 * (len(ordered) - 1))], "max_ms": 1e3 * ordered[-1]}


def token_table(grammar_tokenizer) -> tuple:
    """({token bytes: [token ids]}, longest token in bytes)."""
    by_bytes = {}
    for token in range(VOCAB_SIZE):
        by_bytes.setdefault(grammar_tokenizer.decode_bytes([token]), []).append(token)
    return by_bytes, max(map(len, by_bytes))


def next_token(table: tuple, allowed: np.ndarray, document: bytes, position: int) -> tuple:
    """(token, its length in bytes): the longest token the mask allows that continues `document` at `position`."""
    by_bytes, longest = table
    for length in range(min(longest, len(document) - position), 0, -1):
        token = next((t for t in by_bytes.get(document[position : position + length], []) if allowed[t]), None)
        if token is not None:
            return token, length
    raise AssertionError(f"no allowed token continues the document at byte {position}")


def timed_walk(fill, consume, table: tuple, document: bytes, end: int) -> list:
    """Mask times along the document, then at its end; `fill()` returns the allowed-token bits."""
    times, position = [], 0
    while True:
        start = time.perf_counter()
        allowed = fill()
        times.append(time.perf_counter() - start)
        if position == len(document):
            assert allowed[end], "the grammar does not end where the document does"
            return times
        token, length = next_token(table, allowed, document, position)
        assert consume(token)
        position += length


def measure_llguidance(tokenizer, end: int, schema: dict, document: bytes, table: tuple) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.numpy

    grammar_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB_SIZE, eos_token=end)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                             overrides={"whitespace_flexible": False})
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(grammar_tokenizer, grammar, log_level=0)
    compile_seconds = time.perf_counter() - start
    bitmask = llguidance.numpy.allocate_token_bitmask(1, VOCAB_SIZE)

    def fill():
        llguidance.numpy.fill_next_token_bitmask(matcher, bitmask)
        return np.unpackbits(bitmask.view(np.uint8), bitorder="little")

    times = timed_walk(fill, matcher.consume_token, table, document, end)
    return {**summary(times), "compile_ms": 1e3 * compile_seconds}


def measure_xgrammar(tokenizer, end: int, schema: dict, document: bytes, table: tuple) -> dict:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB_SIZE, stop_token_ids=[end])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
    compile_seconds = time.perf_counter() - start
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB_SIZE)

    def fill():
        matcher.fill_next_token_bitmask(bitmask)
        return np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")

    times = timed_walk(fill, matcher.accept_token, table, document, end)
    return {**summary(times), "compile_ms": 1e3 * compile_seconds}


def measure_mask_application(repeats: int = 200) -> dict:
    """The server's own share: the bitmask unpacked into an mlx boolean mask and applied to the log-probabilities.
    The `where` is one pass over the vocabulary, as the sampler's own softmax is; here it runs on the CPU backend."""
    import mlx.core as mx

    bitmask = np.random.default_rng(0).integers(-2**31, 2**31 - 1, size=(1, VOCAB_SIZE // 32), dtype=np.int32)
    logprobs = mx.random.normal((1, VOCAB_SIZE))
    mx.eval(logprobs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little").view(np.bool_)
        masked = mx.where(mx.array(allowed)[None], logprobs, -mx.inf)
        mx.eval(masked)
        times.append(time.perf_counter() - start)
    return summary(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    pieces = synthetic_vocabulary()
    tokenizer = hf_tokenizer(pieces)
    end = pieces.index("<turn|>")
    import llguidance.hf

    walker = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB_SIZE, eos_token=end)
    results = {"vocab_size": VOCAB_SIZE, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "python": sys.version.split()[0], "engines": {}, "note": "CPU, this 2-core shared machine; "
               "mask time is host work on any backend"}
    table = token_table(walker)
    for name, measure in (("llguidance", measure_llguidance), ("xgrammar", measure_xgrammar)):
        try:
            results["engines"][name] = {
                schema_name: measure(tokenizer, end, schema, json.dumps(document, separators=(",", ":")).encode(),
                                     table)
                for schema_name, (schema, document) in SCHEMAS.items()}
        except ImportError as error:
            results["engines"][name] = {"error": str(error)}
    results["mask_application"] = measure_mask_application()
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
