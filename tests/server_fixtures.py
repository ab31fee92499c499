"""A tiny checkpoint for the server tests: the reference tokenizer plus Gemma 4's tool and string-mark tokens, and a
chat template that declares tools, writes tool calls and tool responses in Gemma 4's syntax (written for these tests:
the shape of the real template, not its text), and a server started on it in a subprocess."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from reference_models import SPECIAL_TOKENS, save_reference_checkpoint

TOOL_TOKENS = ["<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']

TOOL_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set first = messages[0]['role'] -%}"
    "{%- set loop_messages = messages[1:] if first in ['system', 'developer'] else messages -%}"
    "{%- if (enable_thinking is defined and enable_thinking) or tools or first in ['system', 'developer'] -%}"
    "{{- '<|turn>system\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}"
    "{%- if first in ['system', 'developer'] -%}{{- messages[0]['content'] | trim -}}{%- endif -%}"
    "{%- for tool in tools or [] -%}"
    "{{- '<|tool>declaration:' + tool['function']['name'] + '{description:<|\"|>' -}}"
    "{{- (tool['function']['description'] or '') + '<|\"|>}<tool|>' -}}"
    "{%- endfor -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<|tool_response>response:' + (message.get('name') or 'tool') + '{value:<|\"|>' -}}"
    "{{- message['content'] | string + '<|\"|>}<tool_response|>' -}}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{%- if not (role == 'model' and loop.index0 > 0 and loop_messages[loop.index0 - 1]['role'] == 'tool') -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{%- endif -%}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{{- '<|tool_call>call:' + call['function']['name'] + '{' -}}"
    "{%- for key, value in call['function']['arguments'] | dictsort -%}"
    "{{- key + ':' -}}"
    "{%- if value is string -%}{{- '<|\"|>' + value + '<|\"|>' -}}{%- else -%}{{- value | tojson -}}{%- endif -%}"
    "{{- ',' if not loop.last -}}"
    "{%- endfor -%}"
    "{{- '}<tool_call|>' -}}"
    "{%- endfor -%}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- elif message['content'] -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] | trim -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<|image|>' -}}{%- elif item['type'] == 'audio' -%}{{- '<|audio|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|video|>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if not message.get('tool_calls') -%}{{- '<turn|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and loop_messages[-1]['role'] != 'tool' -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
)


def save_server_checkpoint(folder: Path, seed: int = 3, **text_overrides):
    return save_reference_checkpoint(folder, text_overrides or None, seed=seed,
                                     special_tokens=SPECIAL_TOKENS + TOOL_TOKENS, chat_template=TOOL_CHAT_TEMPLATE)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python -m mlx_gemma4.server` on a loopback port, ready once /health answers."""

    def __init__(self, model: Path, *flags, startup_seconds: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
        environment.pop("MLX_GEMMA4_API_KEY", None)
        # A file, not a pipe: a server that logs more than a pipe holds would block on a pipe nobody reads.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlx_gemma4.server", "--model", str(model), "--port", str(self.port),
             *map(str, flags)],
            stdout=subprocess.DEVNULL, stderr=self.log, text=True, env=environment,
        )
        self.wait_until_ready(startup_seconds)

    def wait_until_ready(self, seconds: float):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited: {self.log.read()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not start in time")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}
WEATHER_QUESTION = "What is the weather in Paris?"
WEATHER_THOUGHT = "Ask the tool."
WEATHER_CALL_ARGUMENTS = {"city": "Paris"}
WEATHER_RESULT = "sunny"
WEATHER_ANSWER = "It is sunny."


def weather_conversation(call_id: str = "call_0") -> tuple:
    """(first turn's messages, the model's reply to them, second turn's messages, the reply to those): thinking,
    a tool call, then an answer from the tool's result."""
    first = [{"role": "user", "content": WEATHER_QUESTION}]
    first_reply = (f"<|channel>thought\n{WEATHER_THOUGHT}<channel|><|tool_call>call:get_weather"
                   f'{{city:<|"|>Paris<|"|>}}<tool_call|><|tool_response>')
    call = {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": WEATHER_CALL_ARGUMENTS}}
    second = first + [{"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": WEATHER_RESULT}]
    return first, first_reply, second, f"{WEATHER_ANSWER}<turn|>"


def teach_weather_conversation(model, folder: Path, steps: int = 120, learning_rate: float = 1e-2):
    """Trains the tiny reference model (torch) until its greedy replies are the weather conversation's, so that the
    server's thinking and tool-call parsing meet what a model really wrote. Saves it over the checkpoint."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    first, first_reply, second, second_reply = weather_conversation()
    sequences = []
    for messages, reply in ((first, first_reply), (second, second_reply)):
        prompt = tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], enable_thinking=True, tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        reply_ids = tokenizer.encode(reply, add_special_tokens=False)
        sequences.append((prompt_ids + reply_ids, len(prompt_ids)))
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = 0
        for ids, prompt_length in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0, prompt_length - 1 : -1]
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(ids[prompt_length:]))
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(str(folder))
    return loss.item()
