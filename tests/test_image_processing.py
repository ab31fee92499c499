"""Images become exactly the patches `Gemma4UnifiedImageProcessor` (transformers 5.23 + torchvision) makes."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.image_processing import PatchBudget, load_image, process_image, target_size
from multimodal_fixtures import DATA, reference_inputs

REFERENCE = np.load(DATA / "reference_arrays.npz")
NOTES = json.loads(str(REFERENCE["notes"]))
CASES = [(name, budget) for name in reference_inputs.IMAGES for budget in reference_inputs.BUDGETS.get(name, (280,))]
EXIF_ORIENTATION = 0x0112
ROTATED_90_CLOCKWISE = 6


@pytest.mark.parametrize("name,budget", CASES, ids=[f"{n}@{b}" for n, b in CASES])
def test_patches_equal_the_reference_bit_for_bit(name, budget):
    patches = process_image(DATA / name, PatchBudget(max_soft_tokens=budget))
    key = f"{name}@{budget}"
    assert patches.num_soft_tokens == int(REFERENCE[f"{key}:soft_tokens"][0])
    assert np.array_equal(patches.position_ids, REFERENCE[f"{key}:positions"])
    assert reference_inputs.digest(patches.pixel_values) == NOTES[f"{key}:sha256"]


def test_bytes_pil_and_path_give_the_same_patches():
    path = DATA / "rocket.jpg"
    from_path = process_image(path)
    assert np.array_equal(process_image(path.read_bytes()).pixel_values, from_path.pixel_values)
    assert np.array_equal(process_image(Image.open(path)).pixel_values, from_path.pixel_values)


def test_soft_tokens_stay_within_budget_for_every_aspect_ratio():
    budget = PatchBudget()
    for height, width in [(1, 5000), (5000, 3), (48, 48), (4000, 3000), (720, 1280), (333, 777)]:
        target_height, target_width = target_size(height, width, budget)
        assert target_height % 48 == 0 and target_width % 48 == 0
        assert (target_height // 48) * (target_width // 48) <= budget.max_soft_tokens


def test_exif_rotation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90_CLOCKWISE
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (60, 20), "red").save(path, exif=exif)
    assert load_image(path).size == (20, 60)


def test_transparency_is_laid_on_white():
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert load_image(transparent).getpixel((0, 0)) == (255, 255, 255)


def test_webp_and_animated_gif_first_frame_load(tmp_path):
    Image.new("RGB", (30, 20), "blue").save(tmp_path / "a.webp", lossless=True)
    frames = [Image.new("RGB", (30, 20), colour) for colour in ("green", "red")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "a.webp").getpixel((0, 0)) == (0, 0, 255)
    assert load_image(tmp_path / "a.gif").getpixel((0, 0)) == (0, 128, 0)


def test_truncated_image_is_a_clear_error(tmp_path):
    data = (DATA / "rocket.jpg").read_bytes()
    with pytest.raises(Gemma4Error, match="unreadable or truncated"):
        load_image(data[: len(data) // 2])


def test_not_an_image_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(Gemma4Error, match="not an image"):
        load_image(path)


def test_unsupported_format_is_a_clear_error(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="BMP")
    with pytest.raises(Gemma4Error, match="unsupported image format BMP"):
        load_image(buffer.getvalue())


def test_missing_image_is_a_clear_error(tmp_path):
    with pytest.raises(Gemma4Error, match="image not found"):
        load_image(tmp_path / "nowhere.png")
