"""Video to per-frame 48x48-pixel patches, as `Gemma4UnifiedVideoProcessor` makes them.

Frames are decoded with PyAV (`pip install av`: FFmpeg's decoders, VideoToolbox-built wheels on macOS), sampled
uniformly as the reference's `default_sample_indices_fn` samples them, then each frame is resized and cut like an
image, with a smaller soft-token budget per frame.
"""

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import Gemma4Error
from .image_processing import PatchBudget, pad_patches, patchify, resize_bicubic, target_size

DEFAULT_NUM_FRAMES = 32
VIDEO_BUDGET = PatchBudget(max_soft_tokens=70)
# When a container does not say its frame rate, the reference's prompt assumes this one.
FALLBACK_FPS = 24.0


@dataclass
class Video:
    frames: np.ndarray  # (sampled frames, height, width, 3) uint8 RGB
    timestamps: list  # seconds, one per sampled frame


def sample_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """Evenly spaced frame indices. The reference refuses a video shorter than `num_frames`; we take every frame."""
    count = min(num_frames, total_frames)
    return np.arange(count, dtype=int) * total_frames // count


def load_video(source, num_frames: int = DEFAULT_NUM_FRAMES) -> Video:
    """Decodes the sampled frames of a video file (path or bytes)."""
    try:
        import av
    except ImportError:
        raise Gemma4Error("video input needs PyAV: pip install av") from None

    name = "video bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise Gemma4Error(f"video file not found: {name}")
    try:
        with av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)) as container:
            if not container.streams.video:
                raise Gemma4Error(f"{name}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            total = stream.frames or count_frames(container)
            if total == 0:
                raise Gemma4Error(f"{name}: the video has no frames")
            indices = sample_indices(total, num_frames)
            wanted = set(indices.tolist())
            container.seek(0)
            frames = []
            for index, frame in enumerate(container.decode(video=0)):
                if index > indices[-1]:
                    break
                if index in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except av.error.FFmpegError as error:
        raise Gemma4Error(f"{name}: unreadable video ({error})") from None
    if not frames:
        raise Gemma4Error(f"{name}: no frame could be decoded")
    # A container that overstated its frame count yields fewer frames; keep the indices of those decoded.
    indices = indices[: len(frames)]
    return Video(np.stack(frames), [index / (fps or FALLBACK_FPS) for index in indices])


def count_frames(container) -> int:
    count = sum(1 for _ in container.decode(video=0))
    container.seek(0)
    return count


def as_video(source, num_frames: int) -> Video:
    """A Video from a file, or from frames already in memory ((frames, H, W, 3) uint8, all used, 24 fps)."""
    if isinstance(source, Video):
        return source
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8:
            raise Gemma4Error(f"video frames must be a (frames, height, width, 3) uint8 array, got "
                              f"{source.dtype} {source.shape}")
        return Video(source, [index / FALLBACK_FPS for index in range(len(source))])
    return load_video(source, num_frames)


def timestamp_labels(video: Video) -> list:
    """mm:ss for each sampled frame, as the reference writes them into the prompt."""
    return [f"{int(seconds // 60):02d}:{int(seconds % 60):02d}" for seconds in video.timestamps]


def process_videos(sources: list, budget: PatchBudget = VIDEO_BUDGET, num_frames: int = DEFAULT_NUM_FRAMES) -> dict:
    """The reference video processor's output: every sampled frame of every video along one axis."""
    pixel_values, positions, frames_per_video, tokens_per_frame, labels = [], [], [], [], []
    for source in sources:
        video = as_video(source, num_frames)
        height, width = target_size(video.frames.shape[1], video.frames.shape[2], budget)
        resized = resize_bicubic(video.frames, height, width)
        # The reference normalizes with mean 0 and std 255 (a division), not the images' multiply by 1/255.
        scaled = resized.astype(np.float32) / np.float32(255)
        for frame in scaled:
            patches, frame_positions = patchify(frame, budget.side)
            padded, padded_positions = pad_patches(patches, frame_positions, budget.max_soft_tokens)
            pixel_values.append(padded)
            positions.append(padded_positions)
        frames_per_video.append(len(scaled))
        tokens_per_frame.append(len(patches))
        labels.append(timestamp_labels(video))
    return {
        "pixel_values_videos": np.stack(pixel_values),
        "video_position_ids": np.stack(positions),
        "num_frames_per_video": np.array(frames_per_video),
        "num_soft_tokens_per_video": tokens_per_frame,
        "timestamps_per_video": labels,
    }
