"""The OpenAI request bodies the server accepts, as pydantic models: a wrong type, an unknown role or an out-of-range
value is refused before anything runs. Fields OpenAI clients send that do not change generation are ignored."""

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

# OpenAI's own bound on top_logprobs.
MAX_TOP_LOGPROBS = 20


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class ImageURL(Lenient):
    url: str


class ImagePart(Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Lenient):
    data: str  # base64
    format: str  # "wav", "mp3", "flac", ...


class AudioPart(Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(Lenient):
    url: str


class VideoPart(Lenient):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Union[TextPart, ImagePart, AudioPart, VideoPart]


class FunctionCall(Lenient):
    name: str
    arguments: str = "{}"


class ToolCall(Lenient):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None

    @model_validator(mode="after")
    def media_only_from_users(self):
        if isinstance(self.content, list) and self.role not in ("user", "system", "developer"):
            if any(part.type != "text" for part in self.content):
                raise ValueError(f"a {self.role} message can carry only text parts")
        return self


class FunctionDefinition(Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-.]{1,64}$")
    description: Optional[str] = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Lenient):
    name: str


class NamedToolChoice(Lenient):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(Lenient):
    name: Optional[str] = None
    schema_: dict = Field(alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class StreamOptions(Lenient):
    include_usage: bool = False


class Sampling(Lenient):
    """What both endpoints share."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    @model_validator(mode="after")
    def one_choice(self):
        if self.n != 1:
            raise ValueError("n must be 1: this server generates one choice per request")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return self

    def stop_strings(self) -> list:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    response_format: Optional[ResponseFormat] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: Union[str, list[int]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def prompt_given(self):
        if not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.echo:
            raise ValueError("echo is not supported")
        return self


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
