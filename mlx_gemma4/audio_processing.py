"""Audio to raw 640-sample frames at 16 kHz, as `Gemma4UnifiedAudioFeatureExtractor` makes them.

Files are decoded with soundfile (WAV 8/16/24/32-bit and float, FLAC, OGG), averaged to mono and resampled with
soxr's "HQ" quality: the steps of the reference's `load_audio` soundfile backend (and of `librosa.load`).
"""

import io
import math
from pathlib import Path

import numpy as np

from .errors import Gemma4Error

SAMPLING_RATE = 16_000
SAMPLES_PER_TOKEN = 640  # 40 ms at 16 kHz: one soft token


def load_audio(source) -> np.ndarray:
    """float32 mono samples at 16 kHz from a path, bytes, a (samples, rate) pair, or an array already at 16 kHz."""
    if isinstance(source, tuple):
        samples, rate = source
        return check_length(to_16khz(np.asarray(samples, dtype=np.float32), int(rate)), "audio array")
    if isinstance(source, np.ndarray):
        return check_length(np.ascontiguousarray(source, dtype=np.float32), "audio array")
    import soundfile

    name = "audio bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise Gemma4Error(f"audio file not found: {name}")
    try:
        with soundfile.SoundFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as file:
            rate = file.samplerate
            channels_first = file.read(dtype="float32", always_2d=True).T
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise Gemma4Error(f"{name}: not a readable WAV, FLAC or OGG file ({error})") from None
    if channels_first.shape[1] == 0:
        raise Gemma4Error(f"{name}: the audio is empty")
    mono = channels_first.mean(axis=0) if channels_first.shape[0] > 1 else channels_first[0]
    return check_length(to_16khz(mono, rate), name)


def to_16khz(samples: np.ndarray, rate: int) -> np.ndarray:
    if samples.ndim != 1:
        raise Gemma4Error(f"audio samples must be one channel, got shape {samples.shape}")
    if rate == SAMPLING_RATE:
        return np.ascontiguousarray(samples, dtype=np.float32)
    import soxr

    # The reference trims or pads soxr's output to exactly ceil(samples * 16 kHz / rate).
    length = math.ceil(len(samples) * SAMPLING_RATE / rate)
    resampled = soxr.resample(samples, rate, SAMPLING_RATE, quality="soxr_hq")
    resampled = np.pad(resampled, (0, max(0, length - len(resampled))))[:length]
    return np.ascontiguousarray(resampled, dtype=np.float32)


def check_length(samples: np.ndarray, name: str) -> np.ndarray:
    if samples.size == 0:
        raise Gemma4Error(f"{name}: the audio is empty")
    return samples


def audio_frames(samples: np.ndarray) -> np.ndarray:
    """(tokens, 640) float32: the waveform cut into frames, the last one zero-padded."""
    padding = (-len(samples)) % SAMPLES_PER_TOKEN
    return np.pad(samples, (0, padding)).reshape(-1, SAMPLES_PER_TOKEN).astype(np.float32)


def process_audio(sources: list) -> dict:
    """The feature extractor's output for a list of clips: frames padded to the longest clip, and the mask of real
    frames (padding frames are dropped before they reach the model)."""
    clips = [audio_frames(load_audio(source)) for source in sources]
    longest = max(len(clip) for clip in clips)
    features = np.zeros((len(clips), longest, SAMPLES_PER_TOKEN), dtype=np.float32)
    mask = np.zeros((len(clips), longest), dtype=bool)
    for i, clip in enumerate(clips):
        features[i, : len(clip)] = clip
        mask[i, : len(clip)] = True
    return {"input_features": features, "input_features_mask": mask}
