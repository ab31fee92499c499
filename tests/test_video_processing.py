"""Video files become exactly the frames and patches `Gemma4UnifiedVideoProcessor` makes, sampled as it samples."""

import fractions
import json
import sys

import av  # a test dependency (pyproject's `test` extra): without it these tests fail rather than skip
import numpy as np
import pytest

from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.video_processing import load_video, process_videos, sample_indices
from multimodal_fixtures import DATA, reference_inputs

REFERENCE = np.load(DATA / "reference_arrays.npz")
NOTES = json.loads(str(REFERENCE["notes"]))
# Lossless codecs, so decoded frames equal the frames the reference saw. The .mov states its frame count; the
# .mkv does not, and the frames are counted by decoding.
CONTAINERS = {"mov": ("png", "rgb24"), "mkv": ("ffv1", "bgr0")}


def write_video(path, frames: np.ndarray, codec: str, pixel_format: str, fps: int):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fractions.Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pixel_format
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("suffix", sorted(CONTAINERS))
def test_video_file_gives_the_reference_frames_patches_and_timestamps(tmp_path, suffix):
    path = write_video(tmp_path / f"clip.{suffix}", reference_inputs.video_frames(), *CONTAINERS[suffix],
                       fps=int(reference_inputs.VIDEO_FPS))
    processed = process_videos([path])
    assert processed["num_frames_per_video"].tolist() == REFERENCE["video:frames_per_video"].tolist()
    assert np.array_equal(processed["video_position_ids"], REFERENCE["video:positions"])
    assert reference_inputs.digest(processed["pixel_values_videos"]) == NOTES["video:sha256"]
    expected_stamps = [f"{int(s // 60):02d}:{int(s % 60):02d}" for s in NOTES["video:timestamps"]]
    assert processed["timestamps_per_video"] == [expected_stamps]


def test_sampling_matches_reference_indices():
    assert sample_indices(40, 32).tolist() == REFERENCE["video:frame_indices"].tolist()


def test_short_video_keeps_every_frame(tmp_path):
    frames = reference_inputs.video_frames()[:5]
    video = load_video(write_video(tmp_path / "short.mov", frames, "png", "rgb24", fps=5))
    assert np.array_equal(video.frames, frames)
    assert video.timestamps == [0.0, 0.2, 0.4, 0.6, 0.8]


def test_missing_pyav_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(Gemma4Error, match="pip install av"):
        load_video(tmp_path / "any.mp4")


def test_unreadable_video_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 20)
    with pytest.raises(Gemma4Error, match="broken.mp4"):
        load_video(path)


def test_missing_video_is_a_clear_error(tmp_path):
    with pytest.raises(Gemma4Error, match="video file not found"):
        load_video(tmp_path / "nowhere.mp4")
