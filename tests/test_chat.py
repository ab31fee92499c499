"""`python -m mlx_gemma4.chat`: each turn answers as the library does on the whole conversation; /reset starts over."""

import pytest

from mlx_gemma4.chat import build_parser, run
from mlx_gemma4.generation import generate
from mlx_gemma4.loading import load
from mlx_gemma4.server.chat_format import ReplyParser
from reference_models import save_reference_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    save_reference_checkpoint(folder, seed=5)
    return folder


def chat_session(folder, lines: list, *flags) -> list:
    """The replies, one per line typed: what was written between one prompt for input and the next, less the line
    end the chat puts after each reply (a reply may hold line ends of its own)."""
    args = build_parser().parse_args(["--model", str(folder), "--max-tokens", "10", *flags])
    typed, turns = iter(lines), []

    def read_line(_prompt):
        turns.append([])
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    run(args, read_line=read_line, write=lambda text: turns[-1].append(text))
    replies = ["".join(turn) for turn in turns if turn]
    assert all(reply.endswith("\n") for reply in replies)
    return [reply[:-1] for reply in replies]


def test_each_turn_answers_as_the_library_does_on_the_whole_conversation(checkpoint):
    model, processor = load(checkpoint)
    replies = chat_session(checkpoint, ["Hello fox", "And the dog?"], "--system-prompt", "Be brief.")
    messages = [{"role": "system", "content": "Be brief."}]
    for question, reply in zip(["Hello fox", "And the dog?"], replies):
        messages.append({"role": "user", "content": question})
        expected = generate(model, processor, processor.apply_chat_template(messages), max_tokens=10)
        assert reply == expected
        messages.append({"role": "assistant", "content": ReplyParser().feed(reply, final=True).content})


def test_reset_starts_the_conversation_over(checkpoint):
    first, _, after_reset = chat_session(checkpoint, ["Hello fox", "More", "/reset", "Hello fox"])[:3]
    assert after_reset == first
