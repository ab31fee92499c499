"""Audio becomes exactly the frames `Gemma4UnifiedAudioFeatureExtractor` makes from the reference's load_audio."""

import numpy as np
import pytest
import soundfile
from transformers import Gemma4UnifiedAudioFeatureExtractor
from transformers.audio_utils import load_audio as reference_load_audio

from mlx_gemma4.audio_processing import load_audio, process_audio
from mlx_gemma4.errors import Gemma4Error

RATES = (16_000, 22_050, 44_100, 48_000)
# (container, subtype): the integer widths and float that WAV carries, and the compressed formats.
ENCODINGS = [("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_U8"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"),
             ("OGG", "VORBIS")]


def tone(rate: int, channels: int, seconds: float = 0.37) -> np.ndarray:
    time = np.arange(int(rate * seconds)) / rate
    left = 0.4 * np.sin(2 * np.pi * 440 * time) + 0.1 * np.sin(2 * np.pi * 3000 * time)
    right = 0.3 * np.cos(2 * np.pi * 250 * time)
    return np.stack([left, right][:channels], axis=-1).astype(np.float32)


def write(tmp_path, rate: int, channels: int, container="WAV", subtype="PCM_16"):
    path = tmp_path / f"clip_{rate}_{channels}_{subtype}.{container.lower()}"
    soundfile.write(path, tone(rate, channels), rate, format=container, subtype=subtype)
    return path


def reference_features(paths: list) -> dict:
    waveforms = [reference_load_audio(str(path), sampling_rate=16_000, backend="soundfile") for path in paths]
    return Gemma4UnifiedAudioFeatureExtractor()(waveforms, return_tensors="np")


@pytest.mark.parametrize("channels", (1, 2), ids=("mono", "stereo"))
@pytest.mark.parametrize("rate", RATES)
def test_frames_equal_the_reference_at_any_rate_and_channel_count(tmp_path, rate, channels):
    path = write(tmp_path, rate, channels)
    ours, reference = process_audio([path]), reference_features([path])
    assert np.array_equal(ours["input_features"], reference["input_features"])
    assert np.array_equal(ours["input_features_mask"], reference["input_features_mask"])


@pytest.mark.parametrize("container,subtype", ENCODINGS)
def test_every_encoding_decodes_as_the_reference(tmp_path, container, subtype):
    path = write(tmp_path, 44_100, 2, container, subtype)
    assert np.array_equal(load_audio(path), reference_load_audio(str(path), sampling_rate=16_000,
                                                                 backend="soundfile"))


def test_clips_of_different_lengths_are_padded_and_masked_as_the_reference(tmp_path):
    paths = [write(tmp_path, 16_000, 1), write(tmp_path, 48_000, 2)]
    clips = [np.arange(1000, dtype=np.float32) / 1000, np.ones(2561, dtype=np.float32)]
    ours = process_audio(paths + clips)
    reference = Gemma4UnifiedAudioFeatureExtractor()(
        [reference_load_audio(str(p), sampling_rate=16_000, backend="soundfile") for p in paths] + clips,
        return_tensors="np",
    )
    assert np.array_equal(ours["input_features"], reference["input_features"])
    assert np.array_equal(ours["input_features_mask"], reference["input_features_mask"])


def test_bytes_and_arrays_with_a_rate_are_accepted(tmp_path):
    path = write(tmp_path, 22_050, 1)
    from_path = load_audio(path)
    samples, rate = soundfile.read(path, dtype="float32")
    assert np.array_equal(load_audio(path.read_bytes()), from_path)
    assert np.array_equal(load_audio((samples, rate)), from_path)


def test_zero_length_audio_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros((0, 1), dtype=np.float32), 16_000)
    with pytest.raises(Gemma4Error, match="empty"):
        load_audio(path)


def test_non_audio_file_is_a_clear_error(tmp_path):
    path = tmp_path / "song.wav"
    path.write_text("not audio at all")
    with pytest.raises(Gemma4Error, match="not a readable WAV, FLAC or OGG"):
        load_audio(path)


def test_missing_audio_is_a_clear_error(tmp_path):
    with pytest.raises(Gemma4Error, match="audio file not found"):
        load_audio(tmp_path / "nowhere.wav")
