"""OpenAI chat messages into Gemma 4's chat template, and Gemma 4's reply back into OpenAI fields.

Gemma 4 writes its thinking as `<|channel>thought\n...<channel|>` and a tool call as
`<|tool_call>call:NAME{key:value,...}<tool_call|>`, strings between `<|"|>` marks and keys bare; the call ends the
model's part of the turn with `<|tool_response>`, where the caller's result goes. ReplyParser splits a streamed reply
into content, reasoning and tool calls as the text arrives, holding back only what could be the start of a marker."""

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional

from ..errors import Gemma4Error

THINKING_START, THINKING_END = "<|channel>", "<channel|>"
THINKING_LABEL = "thought\n"
TOOL_CALL_START, TOOL_CALL_END = "<|tool_call>", "<tool_call|>"
TOOL_RESPONSE_START = "<|tool_response>"
STRING_MARK = '<|"|>'
# reasoning_effort values that turn thinking on ("none" and "minimal" leave it off).
THINKING_EFFORTS = {"low", "medium", "high", "xhigh"}


def template_options(chat_template_kwargs: Optional[dict], reasoning_effort: Optional[str]) -> dict:
    options = dict(chat_template_kwargs or {})
    if reasoning_effort is not None and "enable_thinking" not in options:
        options["enable_thinking"] = reasoning_effort in THINKING_EFFORTS
    return options


def template_message(message) -> dict:
    """One schema.Message as the template reads it: content parts become media placeholders, tool-call arguments
    (a JSON string in the OpenAI API) become the mapping the template formats."""
    rendered = {"role": message.role}
    if isinstance(message.content, list):
        rendered["content"] = [{"type": "text", "text": part.text} if part.type == "text" else
                               {"type": MEDIA_KINDS[part.type]} for part in message.content]
    else:
        rendered["content"] = message.content or ""
    if message.tool_calls:
        rendered["tool_calls"] = [{"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": call_arguments(call.function.arguments)}}
            for call in message.tool_calls]
    for name in ("tool_call_id", "name", "reasoning_content"):
        if getattr(message, name, None):
            rendered[name] = getattr(message, name)
    return rendered


MEDIA_KINDS = {"image_url": "image", "input_audio": "audio", "video_url": "video"}


def call_arguments(arguments: str) -> dict:
    try:
        parsed = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        raise Gemma4Error("tool_calls[].function.arguments must be a JSON object string") from None
    if not isinstance(parsed, dict):
        raise Gemma4Error("tool_calls[].function.arguments must be a JSON object string")
    return parsed


def render_chat(processor, messages: list, tools: Optional[list], tool_choice, options: dict) -> str:
    """The prompt text: the model's own template with tools declared unless tool_choice is "none"."""
    if tools and tool_choice != "none":
        options = {**options, "tools": tools}
    try:
        return processor.apply_chat_template([template_message(m) for m in messages], **options)
    except Gemma4Error:
        raise
    except Exception as error:  # a template raises what jinja raises; the user sent what made it fail
        raise Gemma4Error(f"the chat template cannot render these messages: {error}") from None


def forced_tool_grammar(tools: list, tool_choice, token_id) -> Optional[str]:
    """A Lark grammar (llguidance's) for one tool call in Gemma 4's syntax when tool_choice demands one ("required"
    or a named function), else None. The arguments are the function's required parameters in declared order, each
    typed as declared (a string's maxLength and enum kept)."""
    if not tools or tool_choice in (None, "auto", "none"):
        return None
    functions = [tool["function"] for tool in tools]
    if isinstance(tool_choice, dict):
        name = tool_choice.get("function", {}).get("name")
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise Gemma4Error(f"tool_choice names {name!r}, which is not among the tools")
    quote = f"<[{token_id(STRING_MARK)}]>" if token_id(STRING_MARK) is not None else '"\\""'
    calls = []
    for function in functions:
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties", {})
        pairs = [f'"{key}:" {argument_rule(properties.get(key, {}), quote)}' for key in parameters.get("required", [])]
        arguments = ' "," '.join(pairs)
        calls.append(f'"call:{function["name"]}{{" {arguments} "}}"')
    # The call ends the model's part of the turn where the template puts the caller's result.
    response = token_id(TOOL_RESPONSE_START)
    handover = f" <[{response}]>" if response is not None else ""
    return "\n".join([
        f"start: <[{token_id(TOOL_CALL_START)}]> call <[{token_id(TOOL_CALL_END)}]>{handover}",
        "call: " + " | ".join(f"({call})" for call in calls),
    ])


def argument_rule(schema: dict, quote: str) -> str:
    kind = schema.get("type")
    if kind == "integer":
        return "/-?[0-9]{1,18}/"
    if kind == "number":
        return r"/-?[0-9]{1,18}(\.[0-9]{1,18})?/"
    if kind == "boolean":
        return '("true" | "false")'
    if schema.get("enum"):
        return "(" + " | ".join(f"{quote} {json.dumps(str(value))} {quote}" for value in schema["enum"]) + ")"
    length = f"{{0,{int(schema['maxLength'])}}}" if "maxLength" in schema else "*"
    return f"{quote} /(?s:.){length}/ {quote}"


def gemma_arguments_to_json(text: str) -> dict:
    """`{key:<|"|>text<|"|>,n:3,flag:true,nested:{...}}` -> a dict. Strings are lifted out first, so that their
    content never reads as syntax; then bare keys are quoted and the rest is JSON."""
    strings = []

    def lift(match):
        strings.append(match.group(1))
        return f"\x00{len(strings) - 1}\x00"

    body = re.sub(re.escape(STRING_MARK) + r"(.*?)" + re.escape(STRING_MARK), lift, text, flags=re.DOTALL)
    body = re.sub(r"(?<=[{,])\s*([A-Za-z_][\w\-.]*)\s*:", r'"\1":', body)
    body = re.sub("\x00(\\d+)\x00", lambda match: json.dumps(strings[int(match.group(1))]), body)
    parsed = json.loads(body)
    if not isinstance(parsed, dict):
        raise ValueError("arguments are not an object")
    return parsed


def parse_tool_call(text: str) -> Optional[dict]:
    """`call:NAME{...}` -> an OpenAI tool call, or None when the text is not a well-formed call."""
    match = re.fullmatch(r"\s*call:([\w\-.]+)(\{.*\})\s*", text, flags=re.DOTALL)
    if match is None:
        return None
    try:
        arguments = gemma_arguments_to_json(match.group(2))
    except ValueError:
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": match.group(1), "arguments": json.dumps(arguments, ensure_ascii=False)}}


@dataclass
class ReplyPieces:
    content: str = ""
    reasoning: str = ""
    tool_calls: list = field(default_factory=list)


class ReplyParser:
    """Feed it the reply's text as it streams; each feed returns the new ReplyPieces. A tool call is handed out
    whole, when its end marker arrives; a call that does not parse is returned as content, as the model wrote it."""

    MARKERS = (THINKING_START, THINKING_END, TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START)

    def __init__(self):
        self.pending = ""
        self.mode = "content"
        self.label_pending = False
        self.label_buffer = ""
        self.call_text = ""
        self.tool_response_reached = False

    def feed(self, text: str, final: bool = False) -> ReplyPieces:
        pieces = ReplyPieces()
        self.pending += text
        while self.pending and not self.tool_response_reached:
            index, marker = min(((self.pending.find(m), m) for m in self.MARKERS if m in self.pending),
                                default=(-1, None))
            if marker is None:
                keep = 0 if final else self._partial_marker_length()
                self._emit(self.pending[: len(self.pending) - keep], pieces)
                self.pending = self.pending[len(self.pending) - keep:]
                break
            self._emit(self.pending[:index], pieces)
            self.pending = self.pending[index + len(marker):]
            self._switch(marker, pieces)
        if final and self.mode == "tool_call" and self.call_text:
            pieces.content += TOOL_CALL_START + self.call_text  # cut before its end: not a call
            self.call_text = ""
        return pieces

    def _partial_marker_length(self) -> int:
        for length in range(min(len(self.pending), max(map(len, self.MARKERS)) - 1), 0, -1):
            tail = self.pending[-length:]
            if any(m.startswith(tail) for m in self.MARKERS):
                return length
        return 0

    def _emit(self, text: str, pieces: ReplyPieces):
        if not text:
            return
        if self.mode == "tool_call":
            self.call_text += text
        elif self.mode == "thinking":
            if self.label_pending:
                # The channel's name follows its start marker; wait until it is whole to drop it.
                text = self.label_buffer + text
                if len(text) < len(THINKING_LABEL) and THINKING_LABEL.startswith(text):
                    self.label_buffer = text
                    return
                self.label_buffer, self.label_pending = "", False
                text = text[len(THINKING_LABEL):] if text.startswith(THINKING_LABEL) else text
            pieces.reasoning += text
        else:
            pieces.content += text

    def _switch(self, marker: str, pieces: ReplyPieces):
        if marker == THINKING_START and self.mode == "content":
            self.mode, self.label_pending, self.label_buffer = "thinking", True, ""
        elif marker == THINKING_END and self.mode == "thinking":
            pieces.reasoning += self.label_buffer  # a thinking shorter than its label
            self.mode, self.label_pending, self.label_buffer = "content", False, ""
        elif marker == TOOL_CALL_START and self.mode != "tool_call":
            self.mode, self.call_text = "tool_call", ""
        elif marker == TOOL_CALL_END and self.mode == "tool_call":
            call = parse_tool_call(self.call_text)
            if call is None:
                pieces.content += TOOL_CALL_START + self.call_text + TOOL_CALL_END
            else:
                pieces.tool_calls.append(call)
            self.mode, self.call_text = "content", ""
        elif marker == TOOL_RESPONSE_START:
            self.tool_response_reached = True
        else:
            self._emit(marker, pieces)  # a marker out of place is text
