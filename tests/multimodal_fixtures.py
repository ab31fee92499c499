"""Hand-built multimodal prompts for the tiny reference checkpoints: token ids with media placeholders, the
matching random patches and audio frames, and mm_token_type_ids, all named as the reference processor names them."""

import sys
from pathlib import Path

import numpy as np

from reference_models import special_token_ids

DATA = Path(__file__).parent / "data"
# The script that made the reference arrays also makes the inputs they were made from; tests import it.
sys.path.insert(0, str(DATA))
import make_reference_arrays as reference_inputs  # noqa: E402
PATCH_DIMS = 48 * 48 * 3
AUDIO_FRAME = 640
# mm_token_type_ids values, as ProcessorMixin.create_mm_token_type_ids writes them.
TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3


class PromptBuilder:
    """Appends text tokens and media runs to one prompt, keeping the arrays the reference processor would return."""

    def __init__(self, folder: Path, seed: int = 0):
        self.ids = special_token_ids(Path(folder))
        self.rng = np.random.default_rng(seed)
        self.tokens, self.types = [self.ids["<bos>"]], [TEXT]
        self.images, self.image_positions = [], []
        self.frames, self.frame_positions, self.frames_per_video = [], [], []
        self.audio = []

    def text(self, count: int):
        words = self.rng.integers(300, 380, size=count).tolist()
        self.tokens += words
        self.types += [TEXT] * count
        return self

    def _run(self, begin: str, placeholder: str, end: str, count: int, kind: int):
        self.tokens += [self.ids[begin]] + [self.ids[placeholder]] * count + [self.ids[end]]
        self.types += [TEXT] + [kind] * count + [TEXT]

    def image(self, grid_width: int, grid_height: int, padded_to: int):
        pixels, positions = random_patches(self.rng, grid_width, grid_height, padded_to)
        self.images.append(pixels)
        self.image_positions.append(positions)
        self._run("<|image>", "<|image|>", "<image|>", grid_width * grid_height, IMAGE)
        return self

    def video(self, frames: int, grid_width: int, grid_height: int, padded_to: int):
        for _ in range(frames):
            pixels, positions = random_patches(self.rng, grid_width, grid_height, padded_to)
            self.frames.append(pixels)
            self.frame_positions.append(positions)
            self._run("<|image>", "<|video|>", "<image|>", grid_width * grid_height, VIDEO)
            self.text(1)
        self.frames_per_video.append(frames)
        return self

    def audio_clip(self, frames: int):
        self.audio.append(self.rng.uniform(-1, 1, size=(frames, AUDIO_FRAME)).astype(np.float32))
        self._run("<|audio>", "<|audio|>", "<audio|>", frames, AUDIO)
        return self

    def inputs(self) -> dict:
        """input_ids, mm_token_type_ids and every media array present, batch of one."""
        inputs = {"input_ids": np.array([self.tokens]), "mm_token_type_ids": np.array([self.types])}
        if self.images:
            inputs["pixel_values"] = np.stack(self.images)
            inputs["image_position_ids"] = np.stack(self.image_positions)
        if self.frames:
            inputs["pixel_values_videos"] = np.stack(self.frames)
            inputs["video_position_ids"] = np.stack(self.frame_positions)
            inputs["num_frames_per_video"] = np.array(self.frames_per_video)
        if self.audio:
            longest = max(len(clip) for clip in self.audio)
            features = np.zeros((len(self.audio), longest, AUDIO_FRAME), dtype=np.float32)
            mask = np.zeros((len(self.audio), longest), dtype=bool)
            for i, clip in enumerate(self.audio):
                features[i, : len(clip)] = clip
                mask[i, : len(clip)] = True
            inputs["input_features"] = features
            inputs["input_features_mask"] = mask
        return inputs


def random_patches(rng, grid_width: int, grid_height: int, padded_to: int):
    """Pixels in [0, 1) and (x, y) positions in row-major order, padded with zeros and (-1, -1)."""
    count = grid_width * grid_height
    pixels = np.zeros((padded_to, PATCH_DIMS), dtype=np.float32)
    pixels[:count] = rng.random((count, PATCH_DIMS), dtype=np.float32)
    positions = np.full((padded_to, 2), -1, dtype=np.int64)
    xs, ys = np.meshgrid(np.arange(grid_width), np.arange(grid_height), indexing="xy")
    positions[:count] = np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)
    return pixels, positions
