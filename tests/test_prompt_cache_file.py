"""Prompt caches saved to a file: loading one and continuing equals continuing the cache that was saved; a file from
another model, a damaged one or a missing one is refused with our error (the CLI: one line, exit 1)."""

import mlx.core as mx
import pytest

from mlx_gemma4 import cache_prompt, cli
from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.generation import stream_generate
from mlx_gemma4.loading import load
from mlx_gemma4.prompt_cache_file import continuation_ids, load_prompt_cache, save_prompt_cache
from reference_models import save_reference_checkpoint
from speculative_fixtures import window_sized_rings

SHAPE = dict(head_dim=32, global_head_dim=64, sliding_window=4)
PROMPT = list(range(20, 50))  # many windows long
FOLLOW_UP = [70, 71, 72]
DOCUMENT = "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9."


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_cache_file")
    for name, seed in (("model", 3), ("other", 4)):
        save_reference_checkpoint(root / name, SHAPE, vision=False, audio=False, seed=seed)
    return root


@pytest.fixture(scope="module")
def loaded(folders):
    model, processor = load(folders / "model")
    processor.stop_token_ids = set()  # random models stop at random places
    return model, processor


def continue_greedy(model, processor, cache, **options) -> list:
    return [r.token for r in stream_generate(model, processor, FOLLOW_UP, max_tokens=10, prompt_cache=cache,
                                             **options)]


@pytest.mark.parametrize("cache_kind,kv_bits", [("made", None), ("made", 8), ("window-sized rings", None)])
def test_loaded_cache_continues_as_the_saved_one(loaded, tmp_path, cache_kind, kv_bits):
    model, processor = loaded
    cache = model.make_cache() if cache_kind == "made" else window_sized_rings(model)
    options = dict(kv_bits=kv_bits, kv_group_size=32)
    list(stream_generate(model, processor, PROMPT, max_tokens=3, prompt_cache=cache, **options))
    save_prompt_cache(tmp_path / "cache.safetensors", cache, model)
    restored = load_prompt_cache(tmp_path / "cache.safetensors", model)
    assert [c.offset for c in restored] == [c.offset for c in cache]
    assert [c.quantized for c in restored] == [kv_bits is not None] * len(cache)
    assert continue_greedy(model, processor, restored) == continue_greedy(model, processor, cache)


def test_a_cache_from_another_model_is_refused(loaded, folders, tmp_path):
    model, processor = loaded
    other, _ = load(folders / "other")
    cache = other.make_cache()
    list(stream_generate(other, processor, PROMPT, max_tokens=1, prompt_cache=cache))
    save_prompt_cache(tmp_path / "other.safetensors", cache, other)
    with pytest.raises(Gemma4Error, match="made with another model"):
        load_prompt_cache(tmp_path / "other.safetensors", model)


def test_damaged_or_foreign_files_are_refused(loaded, folders, tmp_path):
    model, processor = loaded
    cache = model.make_cache()
    list(stream_generate(model, processor, PROMPT, max_tokens=1, prompt_cache=cache))
    save_prompt_cache(tmp_path / "whole.safetensors", cache, model)
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.safetensors").write_text("not a cache")
    mx.save_safetensors(str(tmp_path / "weights.safetensors"), {"weight": mx.zeros((2, 2))})
    for name, message in [("cut", "not a safetensors file, or damaged"), ("text", "not a safetensors file"),
                          ("weights", "not a prompt cache saved by mlx_gemma4"), ("missing", "no prompt cache file")]:
        with pytest.raises(Gemma4Error, match=message):
            load_prompt_cache(tmp_path / f"{name}.safetensors", model)


def test_an_empty_cache_or_a_wrong_suffix_is_not_saved(loaded, tmp_path):
    model, _ = loaded
    with pytest.raises(Gemma4Error, match="empty"):
        save_prompt_cache(tmp_path / "empty.safetensors", model.make_cache(), model)
    with pytest.raises(Gemma4Error, match="must end in .safetensors"):
        save_prompt_cache(tmp_path / "cache.npz", model.make_cache(), model)


def test_cli_continues_a_cached_document_as_the_api_does(loaded, folders, tmp_path, capsys):
    model, _ = loaded
    _, processor = load(folders / "model")  # one that stops at stop tokens, as the CLI's does
    cache_file = tmp_path / "document.safetensors"
    assert cache_prompt.main(["--model", str(folders / "model"), "--prompt", DOCUMENT, "--prompt-cache-file",
                              str(cache_file), "--kv-bits", "8", "--kv-group-size", "32"]) == 0
    code = cli.main(["--model", str(folders / "model"), "--prompt-cache-file", str(cache_file), "--prompt",
                          " Who jumps?", "-m", "6", "--verbose", "false"])
    out = capsys.readouterr().out
    cache, metadata = load_prompt_cache(cache_file, model, return_metadata=True)
    ids = continuation_ids(processor, metadata, " Who jumps?")
    expected = "".join(r.text for r in stream_generate(model, processor, ids, max_tokens=6, prompt_cache=cache))
    assert code == 0
    assert out == expected + "\n"


@pytest.mark.parametrize("which,message", [("other", "made with another model"), ("damaged", "damaged")])
def test_cli_refuses_a_bad_cache_file_in_one_line(folders, tmp_path, capsys, which, message):
    cache_file = tmp_path / "cache.safetensors"
    assert cache_prompt.main(["--model", str(folders / "other"), "--prompt", DOCUMENT, "--prompt-cache-file",
                              str(cache_file)]) == 0
    if which == "damaged":
        cache_file.write_bytes(cache_file.read_bytes()[:100])
    capsys.readouterr()
    code = cli.main(["--model", str(folders / "model"), "--prompt-cache-file", str(cache_file), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_cache_prompt_never_overwrites_a_file(folders, tmp_path, capsys):
    existing = tmp_path / "mine.safetensors"
    existing.write_bytes(b"the user's")
    code = cache_prompt.main(["--model", str(folders / "model"), "--prompt", DOCUMENT, "--prompt-cache-file",
                              str(existing)])
    assert code == 1 and "exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"the user's"
