"""Grammar-constrained decoding with llguidance: at every step the tokens the grammar forbids get zero probability,
so a reply that ends (finish_reason "stop") always parses. llguidance was chosen by the measured cost of one token's
mask at Gemma 4's 262,144-token vocabulary (bench/grammar_mask_cost.py, bench/results/grammar-mask-cost.json).

The grammar's end is the end-of-turn token: the only token it allows once the value is complete, so the stream stops
there. A reply cut by max_tokens says so (finish_reason "length") and is the valid prefix it reached."""

import copy
import json
import re
from typing import Callable, Optional

import llguidance
import llguidance.numpy
import mlx.core as mx
import numpy as np

from ..errors import Gemma4Error

# Compact JSON: a model with no taste for it could otherwise emit whitespace until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False}


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class GrammarTokenizer:
    """The tokenizer as llguidance sees it (building it takes ~1 s at a 262K vocabulary: made once per server).

    llguidance reads an added special token as writing no text. Some tokenizers register their byte-fallback
    tokens (`<0x7B>`) that way; they are bytes like any other piece, so they go back to the plain vocabulary here."""

    def __init__(self, processor, end_token: int):
        backend = copy.copy(processor.tokenizer._tokenizer.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        description = json.loads(backend.to_str())
        description["added_tokens"] = [token for token in description.get("added_tokens", [])
                                       if not BYTE_TOKEN.fullmatch(token["content"])]
        self.vocab_size = processor.config.text_config.vocab_size
        self.tokenizer = llguidance.LLTokenizer(json.dumps(description), n_vocab=self.vocab_size, eos_token=end_token)


def json_grammar(schema: Optional[dict]) -> str:
    """The grammar of one JSON value: any object (`json_object`), or one that `schema` accepts."""
    schema = {"type": "object"} if schema is None else schema
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except ValueError as error:
        raise Gemma4Error(f"invalid JSON schema: {error}") from None



class ConstrainedSampler:
    """A sampler (log-probabilities (1, vocab) -> token (1,)) that masks what the grammar forbids before `sampler`
    draws. generate_step asks for token n + 1 before handing out token n, so the matcher learns each token here, at
    the next call, from the token it returned last time."""

    def __init__(self, tokenizer: GrammarTokenizer, grammar: str, sampler: Callable):
        self.matcher = llguidance.LLMatcher(tokenizer.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise Gemma4Error(f"invalid grammar: {self.matcher.get_error()}")
        self.vocab_size = tokenizer.vocab_size
        self.sampler = sampler
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, self.vocab_size)
        self.last_token = None

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.last_token is not None:
            self.consume(self.last_token.item())
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask)
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: logprobs.shape[-1]].view(np.bool_)
        token = self.sampler(mx.where(mx.array(allowed)[None], logprobs, -mx.inf))
        self.last_token = token
        return token

    def consume(self, token: int):
        # The mask allowed only this grammar's tokens, so a refusal here is a bug, not bad input.
        assert self.matcher.consume_token(token), self.matcher.get_error()
