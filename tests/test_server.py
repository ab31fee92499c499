"""`python -m mlx_gemma4.server` over real HTTP on loopback, through the official openai client. Two server processes
for the module: one on a tiny random checkpoint, whose replies depend on every token of the prompt, and one on a tiny
checkpoint taught a conversation with thinking and a tool call (server_fixtures.py), which it then replays whatever
it is asked."""

import base64
import http.client
import io
import json
import threading
import urllib.error
import urllib.request

import jsonschema
import numpy as np
import openai
import pytest
import soundfile
from PIL import Image

from mlx_gemma4.generation import generate, stream_generate
from mlx_gemma4.loading import load
from mlx_gemma4.server.chat_format import ReplyParser
from server_fixtures import (WEATHER_ANSWER, WEATHER_CALL_ARGUMENTS, WEATHER_THOUGHT, WEATHER_TOOL, ServerProcess,
                             save_server_checkpoint, teach_weather_conversation, weather_conversation)

API_KEY = "test-key"
MAX_REQUEST_BYTES = 2_000_000
MAX_MEDIA_BYTES = 500_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    save_server_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def server(checkpoint):
    process = ServerProcess(checkpoint, "--api-key", API_KEY, "--max-request-bytes", MAX_REQUEST_BYTES,
                            "--max-media-bytes", MAX_MEDIA_BYTES, "--max-tokens", 64)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def taught_client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taught")
    teach_weather_conversation(save_server_checkpoint(folder), folder)
    process = ServerProcess(folder)
    yield openai.OpenAI(base_url=f"{process.url}/v1", api_key="unused", max_retries=0, timeout=120)
    process.stop()


@pytest.fixture(scope="module")
def library(checkpoint):
    return load(checkpoint)


def chat(client, messages, **options):
    return client.chat.completions.create(model="tiny", messages=messages, **options)


def expected_reply(library, messages, max_tokens, **media) -> str:
    """The reply's content as the library generates it greedily, and as the server's own parser reads it (a random
    model writes Gemma's markup tokens now and then)."""
    model, processor = library
    text = generate(model, processor, processor.apply_chat_template(messages), max_tokens=max_tokens, **media)
    return ReplyParser().feed(text, final=True).content


def png_data_url(width=64, height=48, color=(200, 30, 30)) -> tuple:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue(), "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_bytes(seconds=0.4) -> bytes:
    buffer = io.BytesIO()
    samples = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(16_000 * seconds)) / 16_000)
    soundfile.write(buffer, samples.astype(np.float32), 16_000, format="WAV")
    return buffer.getvalue()


def raw_post(server, path, body: bytes, key=API_KEY, content_type="application/json"):
    """(status, parsed body) of a request the openai client would never send."""
    headers = {"Content-Type": content_type}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{server.url}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_lists_the_served_model(client, checkpoint):
    assert [model.id for model in client.models.list().data] == [str(checkpoint)]


def test_greedy_chat_equals_library_generate(client, library):
    messages = [{"role": "user", "content": "Hello fox"}]
    response = chat(client, messages, max_tokens=24, temperature=0)
    assert response.choices[0].message.content == expected_reply(library, messages, 24)
    assert response.usage.completion_tokens <= 24 and response.usage.prompt_tokens > 0


def test_completion_of_the_chat_prompt_equals_library_generate_token_for_token(client, library):
    model, processor = library
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hello fox"}])
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, logprobs=0)
    expected = [r.token for r in stream_generate(model, processor, prompt, max_tokens=24)]
    assert response.choices[0].text == generate(model, processor, prompt, max_tokens=24)
    assert [processor.tokenizer.decode([t]) for t in expected] == response.choices[0].logprobs.tokens


def test_streamed_deltas_join_to_the_plain_reply_and_usage_comes_last(client):
    messages = [{"role": "user", "content": "Numbers: 1 2 3"}]
    plain = chat(client, messages, max_tokens=20).choices[0].message.content
    chunks = list(chat(client, messages, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_a_stop_string_cuts_the_reply_before_it(client):
    messages = [{"role": "user", "content": "Tell me about the quick brown fox."}]
    full = chat(client, messages, max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), "pick a prompt whose reply has printable text in its middle"
    choice = chat(client, messages, max_tokens=24, stop=[stop]).choices[0]
    assert choice.message.content == full[: full.index(stop)] and choice.finish_reason == "stop"


def test_chat_logprobs_give_each_token_and_its_likeliest_alternatives(client):
    response = chat(client, [{"role": "user", "content": "Hello fox"}], max_tokens=8, logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens
    for entry in entries:
        values = [top.logprob for top in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0], abs=1e-6)  # greedy takes the likeliest


def test_text_completion_equals_library_generate(client, library):
    model, processor = library
    prompt = "<bos>The quick brown"
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=12)
    assert response.choices[0].text == generate(model, processor, prompt, max_tokens=12)


def test_second_turn_reuses_the_cache_and_equals_a_cold_run(client, library):
    first = [{"role": "user", "content": "Tell me about the lazy dog."}]
    reply = chat(client, first, max_tokens=16).choices[0].message.content
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the fox?"}]
    response = chat(client, second, max_tokens=16)
    assert response.usage.prompt_tokens_details.cached_tokens > 0
    assert response.choices[0].message.content == expected_reply(library, second, 16)


def test_image_message_equals_library_generate(client, library):
    image, url = png_data_url()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is this?"}]}]
    response = chat(client, messages, max_tokens=10)
    template = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert response.choices[0].message.content == expected_reply(library, template, 10, images=[image])


def test_audio_message_equals_library_generate(client, library):
    audio = wav_bytes()
    messages = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}},
        {"type": "text", "text": "What do you hear?"}]}]
    response = chat(client, messages, max_tokens=10)
    template = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What do you hear?"}]}]
    assert response.choices[0].message.content == expected_reply(library, template, 10, audio=[audio])


def test_video_message_equals_library_generate(client, library, tmp_path):
    import av

    path = tmp_path / "clip.mov"
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 48, 64, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    url = "data:video/quicktime;base64," + base64.b64encode(path.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    response = chat(client, messages, max_tokens=8)
    template = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    assert response.choices[0].message.content == expected_reply(library, template, 8, video=str(path))


def test_same_tokens_over_another_image_do_not_reuse_its_cache(client):
    text = {"type": "text", "text": "Describe."}
    for color in ((10, 200, 10), (10, 10, 200)):
        url = png_data_url(color=color)[1]
        response = chat(client, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                text]}], max_tokens=3)
    # The prompt differs only inside the image, which starts after a few tokens: nothing past them is reused.
    assert response.usage.prompt_tokens_details.cached_tokens < 10


def test_thinking_and_tool_call_are_parsed_out_of_the_reply(taught_client):
    first, *_ = weather_conversation()
    response = chat(taught_client, first, tools=[WEATHER_TOOL], extra_body={"chat_template_kwargs": {"enable_thinking": True}},
                    max_tokens=60)
    choice = response.choices[0]
    assert choice.message.reasoning_content == WEATHER_THOUGHT
    assert not choice.message.content and choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == WEATHER_CALL_ARGUMENTS


def test_reasoning_effort_turns_thinking_on(taught_client):
    first, *_ = weather_conversation()
    response = chat(taught_client, first, tools=[WEATHER_TOOL], reasoning_effort="high", max_tokens=60)
    assert response.choices[0].message.reasoning_content == WEATHER_THOUGHT


def test_streamed_thinking_and_tool_call_never_leak_into_content(taught_client):
    first, *_ = weather_conversation()
    chunks = list(chat(taught_client, first, tools=[WEATHER_TOOL], extra_body={"chat_template_kwargs": {"enable_thinking": True}},
                       max_tokens=60, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == WEATHER_THOUGHT
    assert "".join(d.content or "" for d in deltas) == ""
    [call] = [call for d in deltas for call in d.tool_calls or []]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == WEATHER_CALL_ARGUMENTS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_result_goes_back_for_the_next_turn(taught_client):
    first, *_ = weather_conversation()
    options = dict(tools=[WEATHER_TOOL], extra_body={"chat_template_kwargs": {"enable_thinking": True}}, max_tokens=60)
    message = chat(taught_client, first, **options).choices[0].message
    [call] = message.tool_calls
    second = first + [message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": "sunny"}]
    response = chat(taught_client, second, **options)
    assert response.choices[0].message.content == WEATHER_ANSWER
    assert response.usage.prompt_tokens_details.cached_tokens > 0


def test_required_tool_choice_yields_a_call_whatever_the_model_prefers(client):
    # 120 tokens hold the longest call the grammar allows: 12 characters of up to 4 byte tokens each, and the syntax.
    response = chat(client, [{"role": "user", "content": "Hello fox"}], tools=[WEATHER_TOOL],
                    tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=120)
    [call] = response.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and set(arguments) == {"city"} and len(arguments["city"]) <= 12


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "maxItems": 3,
                                                                          "items": {"enum": ["red", "green"]}}},
     "required": ["ok", "tags"], "additionalProperties": False},
    {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "integer", "minimum": -5, "maximum": 5}},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_replies_validate_even_on_random_weights(client, schema):
    response = chat(client, [{"role": "user", "content": "Answer in JSON."}], max_tokens=120,
                    response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)


def test_json_cut_by_max_tokens_says_length(client):
    response = chat(client, [{"role": "user", "content": "Answer in JSON."}], max_tokens=2,
                    response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMAS[0]}})
    assert response.choices[0].finish_reason == "length"


def test_eight_concurrent_clients_each_get_their_own_reply(client, library):
    prompts = [f"Count {n} {'fox ' * n}" for n in range(8)]
    expected = [expected_reply(library, [{"role": "user", "content": p}], 12) for p in prompts]
    replies = [None] * 8

    def ask(index):
        replies[index] = chat(client, [{"role": "user", "content": prompts[index]}], max_tokens=12)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [reply.choices[0].message.content for reply in replies] == expected


def test_a_client_leaving_mid_stream_stops_its_generation(client):
    # Unstopped, 100,000 tokens would hold the model far past the next request's timeout.
    stream = chat(client, [{"role": "user", "content": "Go on forever"}], max_tokens=100_000, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    quick = openai.OpenAI(base_url=str(client.base_url), api_key=API_KEY, max_retries=0, timeout=60)
    assert chat(quick, [{"role": "user", "content": "Hello fox"}], max_tokens=4).choices[0].message.content


def test_the_model_field_never_loads_anything(client, checkpoint):
    response = chat(client, [{"role": "user", "content": "Hello"}], max_tokens=2, extra_body={"model": "/etc"})
    assert response.model == str(checkpoint)


def test_missing_or_wrong_api_key_is_401(server):
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    for key in (None, "wrong"):
        status, error = raw_post(server, "/v1/chat/completions", body, key=key)
        assert status == 401 and error["error"]["code"] == "invalid_api_key"


def post_large_body(server, chunked: bool):
    """Declares (or streams in chunks) a body past the limit, sends only its start, then reads the answer."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Authorization", f"Bearer {API_KEY}")
    connection.putheader("Content-Type", "application/json")
    start = b'{"messages": [{"role": "user", "content": "' + b"x" * 65536
    try:
        if chunked:
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
            for _ in range(MAX_REQUEST_BYTES // len(start) + 2):
                connection.send(b"%x\r\n%s\r\n" % (len(start), start))
        else:
            connection.putheader("Content-Length", str(MAX_REQUEST_BYTES + 1))
            connection.endheaders()
            connection.send(start)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed without reading the rest, as it should
    response = connection.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.parametrize("chunked", [False, True], ids=["declared length", "chunked"])
def test_a_body_past_the_limit_is_413_before_it_is_read_whole(server, chunked):
    status, error = post_large_body(server, chunked)
    assert status == 413 and "limit" in error["error"]["message"]


BAD_REQUESTS = {
    "malformed JSON": b'{"messages": [',
    "wrong type": json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}).encode(),
    "unknown role": json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(),
    "no messages": json.dumps({"messages": []}).encode(),
    "n above 1": json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(),
    "not an image": json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}
    ]}]}).encode(),
    "image over its limit": json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (MAX_MEDIA_BYTES * 2)}}
    ]}]}).encode(),
    "local file": json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]}).encode(),
    "remote URL": json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]}]}).encode(),
    "unknown tool": json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL],
                                "tool_choice": {"type": "function", "function": {"name": "nope"}}}).encode(),
    "bad tool arguments": json.dumps({"messages": [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]},
        {"role": "user", "content": "hi"}]}).encode(),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_input_is_400_with_an_error_object(server, name):
    status, error = raw_post(server, "/v1/chat/completions", BAD_REQUESTS[name])
    assert status == 400, error
    assert error["error"]["type"] == "invalid_request_error" and "Traceback" not in error["error"]["message"]


def test_the_server_still_answers_after_bad_requests(client):
    assert chat(client, [{"role": "user", "content": "Hello fox"}], max_tokens=3).choices[0].message.content
