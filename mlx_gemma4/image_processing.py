"""Images to 48x48-pixel patches, as `Gemma4UnifiedImageProcessor` makes them, without torch.

An image is opened (path, bytes or PIL; EXIF rotation applied; transparency laid on white), resized to the largest
size that keeps its aspect ratio within the soft-token budget and is a multiple of 48 on both sides, scaled to
[0, 1], cut into 48x48 patches in reading order and padded to the budget.
"""

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import Gemma4Error

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
PADDING_POSITION = -1
# The reference's bicubic filter: Keys' cubic with a = -0.5, as Pillow and torch's antialiased resize use.
CUBIC_A = -0.5
CUBIC_SUPPORT = 2.0
# torch packs each resize weight into an int16 with as many fraction bits as the largest weight allows, at most 22.
MAX_WEIGHT_BITS = 22
INT16_LIMIT = 1 << 15


@dataclass
class PatchBudget:
    """Patch geometry and the soft-token budget per image (per frame for video)."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280

    def __post_init__(self):
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise Gemma4Error(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, not {self.max_soft_tokens}")

    @property
    def side(self) -> int:
        """Pixels per side of one soft token's patch (48)."""
        return self.patch_size * self.pooling_kernel_size

    @classmethod
    def from_dict(cls, params: dict) -> "PatchBudget":
        return cls(**{k: v for k, v in params.items() if k in cls.__dataclass_fields__})


@dataclass
class ImagePatches:
    pixel_values: np.ndarray  # (max_soft_tokens, 48*48*3) float32, zero rows past the image
    position_ids: np.ndarray  # (max_soft_tokens, 2) int64 (x, y) of each patch, (-1, -1) for padding
    num_soft_tokens: int


def load_image(source) -> Image.Image:
    """A decoded RGB image from a path, bytes or a PIL image; one clear Gemma4Error for anything unreadable."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    name = "image bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        opened = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else Path(source))
        if opened.format not in SUPPORTED_FORMATS:
            raise Gemma4Error(f"{name}: unsupported image format {opened.format} (expected PNG, JPEG, WebP or GIF)")
        opened.seek(0)  # an animated GIF or WebP gives its first frame
        opened.load()
        # As the reference's load_image: the camera's orientation tag is applied.
        return to_rgb(ImageOps.exif_transpose(opened))
    except FileNotFoundError:
        raise Gemma4Error(f"image not found: {name}") from None
    except UnidentifiedImageError:
        raise Gemma4Error(f"{name}: not an image (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise Gemma4Error(f"{name}: unreadable or truncated image ({error})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; anything transparent is laid on white first, as the reference's convert_to_rgb does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def target_size(height: int, width: int, budget: PatchBudget) -> tuple:
    """The reference's get_aspect_ratio_preserving_size: the largest multiple-of-48 size within the budget."""
    max_patches = budget.max_soft_tokens * budget.pooling_kernel_size**2
    factor = math.sqrt(max_patches * budget.patch_size**2 / (height * width))
    side = budget.side
    target_height = int(math.floor(factor * height / side)) * side
    target_width = int(math.floor(factor * width / side)) * side
    if target_height == 0 and target_width == 0:
        raise Gemma4Error(f"image of {width}x{height} pixels is too small to resize")
    longest = (max_patches // budget.pooling_kernel_size**2) * side
    # A very long, thin image keeps one patch across and as many along as its aspect ratio allows.
    if target_height == 0:
        target_height, target_width = side, min(int(math.floor(width / height)) * side, longest)
    elif target_width == 0:
        target_width, target_height = side, min(int(math.floor(height / width)) * side, longest)
    return target_height, target_width


def cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * CUBIC_A
    return np.where(x < 1.0, near, np.where(x < CUBIC_SUPPORT, far, 0.0))


def resize_taps(input_size: int, output_size: int) -> tuple:
    """Source indices (output, taps) and int16 weights with their fraction bits, as torch's antialiased uint8
    bicubic resize computes them (`_compute_index_ranges_int16_weights`): weights in double, normalized per output
    pixel, then rounded to integers with one precision for the whole axis."""
    scale = input_size / output_size
    support = CUBIC_SUPPORT * scale if scale >= 1.0 else CUBIC_SUPPORT
    taps = int(math.ceil(support)) * 2 + 1
    inverse_scale = 1.0 / scale if scale >= 1.0 else 1.0
    indices = np.zeros((output_size, taps), dtype=np.int64)
    weights = np.zeros((output_size, taps), dtype=np.float64)
    for i in range(output_size):
        center = scale * (i + 0.5)
        start = max(int(center - support + 0.5), 0)
        count = min(max(min(int(center + support + 0.5), input_size) - start, 0), taps)
        offsets = np.arange(count)
        w = cubic((offsets + start - center + 0.5) * inverse_scale)
        total = w.sum()
        if total != 0.0:
            weights[i, :count] = w / total
        indices[i, :count] = start + offsets
    largest = weights.max()
    bits = 0
    while bits < MAX_WEIGHT_BITS and int(0.5 + largest * (1 << (bits + 1))) < INT16_LIMIT:
        bits += 1
    scaled = weights * (1 << bits)
    integer_weights = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    return indices, integer_weights, bits


def resize_axis(pixels: np.ndarray, output_size: int, axis: int) -> np.ndarray:
    """One separable pass over uint8 pixels in integer arithmetic, rounded and clamped back to uint8."""
    indices, weights, bits = resize_taps(pixels.shape[axis], output_size)
    # int32 holds every sum: 255 * 2**15 per tap, a few dozen taps.
    source = np.ascontiguousarray(np.moveaxis(pixels, axis, 0)).astype(np.int32)
    weights = weights.astype(np.int32)
    total = np.full((output_size, *source.shape[1:]), 1 << (bits - 1) if bits else 0, dtype=np.int32)
    expand = (slice(None),) + (None,) * (source.ndim - 1)
    for tap in range(indices.shape[1]):
        total += weights[:, tap][expand] * source[indices[:, tap]]
    return np.moveaxis(np.clip(total >> bits, 0, 255).astype(np.uint8), 0, axis)


def resize_bicubic(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., H, W, C) uint8 to (..., height, width, C), equal to torchvision's antialiased bicubic resize of a uint8
    tensor on CPU (the reference's path): width first, then height, each pass rounded to uint8."""
    if pixels.shape[-2] != width:
        pixels = resize_axis(pixels, width, pixels.ndim - 2)
    if pixels.shape[-3] != height:
        pixels = resize_axis(pixels, height, pixels.ndim - 3)
    return pixels


def patchify(pixels: np.ndarray, side: int) -> tuple:
    """(H, W, 3) float to (patches, side*side*3) in reading order, each patch row-major with channels last, and
    their (x, y) grid positions: the reference's 16-pixel patches merged 3x3, which is the same thing."""
    rows, columns = pixels.shape[0] // side, pixels.shape[1] // side
    patches = pixels.reshape(rows, side, columns, side, 3).transpose(0, 2, 1, 3, 4).reshape(rows * columns, -1)
    xs, ys = np.meshgrid(np.arange(columns), np.arange(rows), indexing="xy")
    return patches, np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1).astype(np.int64)


def pad_patches(patches: np.ndarray, positions: np.ndarray, length: int) -> tuple:
    padded = np.zeros((length, patches.shape[1]), dtype=np.float32)
    padded[: len(patches)] = patches
    padded_positions = np.full((length, 2), PADDING_POSITION, dtype=np.int64)
    padded_positions[: len(positions)] = positions
    return padded, padded_positions


def process_image(source, budget: PatchBudget = PatchBudget()) -> ImagePatches:
    pixels = np.asarray(load_image(source))
    height, width = target_size(pixels.shape[0], pixels.shape[1], budget)
    resized = resize_bicubic(pixels, height, width)
    # As torch: uint8 times the float32 of 1/255.
    scaled = resized.astype(np.float32) * np.float32(1 / 255)
    patches, positions = patchify(scaled, budget.side)
    pixel_values, position_ids = pad_patches(patches, positions, budget.max_soft_tokens)
    return ImagePatches(pixel_values, position_ids, len(patches))


def process_images(sources: list, budget: PatchBudget = PatchBudget()) -> dict:
    """The reference image processor's output for a list of images, as numpy arrays."""
    processed = [process_image(source, budget) for source in sources]
    return {
        "pixel_values": np.stack([p.pixel_values for p in processed]),
        "image_position_ids": np.stack([p.position_ids for p in processed]),
        "num_soft_tokens_per_image": [p.num_soft_tokens for p in processed],
    }
