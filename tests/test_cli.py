"""The command line (`mlx-gemma4`, `python -m mlx_gemma4`): the reply on stdout, statistics on stderr, bad input as one
line and an exit code."""

import io
import subprocess
import sys

import mlx.core as mx
import pytest
import torch

from mlx_gemma4.cli import main
from mlx_gemma4.generation import stream_responses
from mlx_gemma4.loading import load
from reference_models import save_reference_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    reference = save_reference_checkpoint(folder, dict(max_position_embeddings=64), seed=7)
    return folder, reference


def run_cli(capsys, *args):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_info:  # argparse's own refusals (a malformed flag value) exit from parse_args
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_greedy_output_equals_transformers_greedy_generate(checkpoint, capsys):
    folder, reference = checkpoint
    _, processor = load(folder)
    ids = processor.encode(processor.chat_prompt("Hello fox", system_prompt="Be brief."))
    stop = sorted(processor.stop_token_ids)
    generated = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=stop,
                                   pad_token_id=0)[0, len(ids):].tolist()
    # Random weights emit stray byte tokens, whose invalid UTF-8 each decoder renders its own way; so the expected
    # text is the reference's tokens through our streaming detokenizer (tested on valid text elsewhere).
    steps = ((token, mx.zeros((1,))) for token in generated)
    expected = "".join(r.text for r in stream_responses(steps, processor, len(ids), 16))
    code, out, err = run_cli(capsys, "--model", folder, "--prompt", "Hello fox", "--system-prompt", "Be brief.",
                             "--max-tokens", 16)
    assert code == 0
    assert out == expected + "\n"
    assert "Generation:" in err and "Peak memory:" in err and "Time to first token:" in err


def test_prompt_from_stdin(checkpoint, capsys, monkeypatch):
    folder, _ = checkpoint
    code, from_flag, _ = run_cli(capsys, "--model", folder, "--prompt", "Hello fox", "-m", 5, "--verbose", "false")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello fox"))
    code, from_stdin, err = run_cli(capsys, "--model", folder, "--prompt", "-", "-m", 5, "--verbose", "false")
    assert code == 0 and from_stdin == from_flag and err == ""


def test_ignore_chat_template_feeds_the_prompt_as_is(checkpoint, capsys):
    folder, _ = checkpoint
    model, processor = load(folder)
    from mlx_gemma4.generation import generate

    expected = generate(model, processor, "<bos>raw text", max_tokens=6)
    code, out, _ = run_cli(capsys, "--model", folder, "--prompt", "<bos>raw text", "--ignore-chat-template", "-m", 6)
    assert code == 0 and out == expected + "\n"


def test_chat_template_config_reaches_the_template(checkpoint):
    _, processor = load(checkpoint[0])
    assert "<|think|>" in processor.chat_prompt("hi", enable_thinking=True)
    assert "<|think|>" not in processor.chat_prompt("hi")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--temp", "-1"], "--temp"),
        (["--temp", "nan"], "--temp"),
        (["--temp", "inf"], "--temp"),
        (["--top-p", "nan"], "--top-p"),
        (["--top-p", "-inf"], "--top-p"),
        (["--min-p", "nan"], "--min-p"),
        (["--num-draft-tokens", "0", "--draft-model", "absent"], "--num-draft-tokens"),
        (["--top-p", "2"], "--top-p"),
        (["--min-p", "-0.5"], "--min-p"),
        (["--top-k", "-3"], "--top-k"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--prefill-step-size", "0"], "--prefill-step-size"),
        (["--chat-template-config", "{oops"], "not valid JSON"),
        (["--chat-template-config", "[1]"], "JSON object"),
        (["--prompt", "word " * 80], "context holds 64"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(checkpoint, capsys, flags, fragment):
    folder, _ = checkpoint
    arguments = ["--model", folder, "--prompt", "hi", *flags]
    code, out, err = run_cli(capsys, *arguments)
    assert code != 0 and out == ""
    assert fragment in err and err.count("\n") == 1 and err.startswith("error: ")


def test_missing_model_is_one_line_without_traceback(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "mlx_gemma4", "--model", str(tmp_path / "absent"), "--prompt", "hi"],
        capture_output=True, text=True,
    )
    assert process.returncode == 1 and process.stdout == ""
    assert process.stderr.count("\n") == 1 and "Traceback" not in process.stderr and "not found" in process.stderr


def test_unknown_flag_is_one_line_without_usage_block():
    process = subprocess.run([sys.executable, "-m", "mlx_gemma4", "--model", "x", "--prompt", "hi", "--bogus"],
                             capture_output=True, text=True)
    assert process.returncode == 2 and process.stderr.count("\n") == 1 and "--bogus" in process.stderr


def test_flags_are_checked_before_any_model_is_loaded(tmp_path, capsys, monkeypatch):
    from mlx_gemma4 import loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a model was loaded before the flags were checked"))
    code, out, err = run_cli(capsys, "--model", tmp_path / "absent", "--prompt", "hi", "--draft-model",
                             tmp_path / "absent", "--num-draft-tokens", "0")
    assert code == 1 and out == ""
    assert err == "error: --num-draft-tokens must be between 1 and 15\n"


def test_a_reply_cut_short_by_the_context_says_so_on_stderr(checkpoint, capsys):
    folder, _ = checkpoint
    code, out, err = run_cli(capsys, "--model", folder, "--prompt", "Hello fox", "-m", 200, "--verbose", "false")
    assert code == 0 and out.strip()
    assert err.count("\n") == 1 and "context (64 tokens) is full" in err


def test_a_reply_that_ends_at_max_tokens_gives_no_context_note(checkpoint, capsys):
    folder, _ = checkpoint
    code, _, err = run_cli(capsys, "--model", folder, "--prompt", "Hello fox", "-m", 3, "--verbose", "false")
    assert code == 0 and err == ""


def test_one_generated_token_reports_no_generation_rate(checkpoint, capsys):
    folder, _ = checkpoint
    code, _, err = run_cli(capsys, "--model", folder, "--prompt", "Hello fox", "-m", 1)
    generation = [line for line in err.splitlines() if line.startswith("Generation:")]
    assert code == 0 and generation == ["Generation: 1 tokens"]


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    for default in ("most tokens to generate (default: 256", "greedy (default: 0.0)", "keep all (default: 1.0)",
                    "prompt tokens processed per step (default: 2048)", "(default: adapt to the acceptance rate)"):
        assert default in text


def test_the_console_script_runs_the_command_line():
    import importlib
    import re
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    module, function = re.search(r'^mlx-gemma4 = "([\w.]+):(\w+)"$', pyproject, re.MULTILINE).groups()
    assert getattr(importlib.import_module(module), function) is main
