"""Makes the small reference arrays the processor tests compare against.

Two steps, on two machines:
  --make-inputs (here, needs scikit-image): writes the test photographs (small PNG/JPEG/GIF files) and a tiny
      Gemma-4-style tokenizer into tests/data.
  --out DIR (anywhere with torch, torchvision and transformers 5.23): runs the reference image processor, video
      processor and full processor on those files and writes reference_arrays.npz into DIR. Pixel arrays are kept
      as SHA-256 digests plus per-patch sums (the full arrays would be megabytes); equal digests mean bit-equal.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).parent
# (file, how it is made from a scikit-image sample) - several sizes, aspect ratios and pixel formats.
IMAGES = {
    "rocket.jpg": "rocket, 427x640 photograph, upscaled to the budget",
    "hubble.jpg": "hubble_deep_field, 872x1000, downscaled",
    "retina.jpg": "retina, 1411x1411, downscaled a lot",
    "astronaut_tall.jpg": "astronaut cropped to 512x180 (tall)",
    "camera_grey.png": "camera, greyscale, 256x256",
    "logo_rgba.png": "logo, RGBA with transparency, 100x100",
    "chelsea_palette.gif": "chelsea quantized to a 64-colour palette, 150x225",
    "strip.png": "a 3x1200 strip: too thin for one patch row at the budget",
    "tiny.png": "astronaut shrunk to 20x30",
}
BUDGETS = {"rocket.jpg": (70, 280, 1120), "hubble.jpg": (280, 1120)}
VIDEO_FRAMES, VIDEO_FPS, VIDEO_HEIGHT, VIDEO_WIDTH = 40, 15.0, 120, 160
AUDIO_SAMPLES = 16_000 + 123  # a second and a bit: the last frame is zero-padded


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def video_frames() -> np.ndarray:
    """40 frames of a camera panning over the palette photograph: deterministic, lossless."""
    picture = np.asarray(Image.open(DATA / "chelsea_palette.gif").convert("RGB"))
    big = np.asarray(Image.fromarray(picture).resize((450, 300), Image.NEAREST))
    return np.stack([big[60 + t : 60 + t + VIDEO_HEIGHT, 4 * t : 4 * t + VIDEO_WIDTH] for t in range(VIDEO_FRAMES)])


def audio_clip() -> np.ndarray:
    time = np.arange(AUDIO_SAMPLES) / 16_000
    return (0.3 * np.sin(2 * np.pi * 440 * time) + 0.05 * np.cos(2 * np.pi * 97 * time)).astype(np.float32)


def make_inputs():
    import skimage.data as samples

    def save(name, array, **options):
        Image.fromarray(array).save(DATA / name, **options)

    save("rocket.jpg", samples.rocket(), quality=80)
    save("hubble.jpg", samples.hubble_deep_field(), quality=75)
    save("retina.jpg", samples.retina(), quality=70)
    save("astronaut_tall.jpg", samples.astronaut()[:, 160:340], quality=85)
    save("camera_grey.png", np.asarray(Image.fromarray(samples.camera()).resize((256, 256))))
    save("logo_rgba.png", np.asarray(Image.fromarray(samples.logo()).resize((100, 100))))
    chelsea = Image.fromarray(samples.chelsea()).resize((225, 150)).quantize(64)
    chelsea.save(DATA / "chelsea_palette.gif")
    save("strip.png", samples.coffee()[200:203, :].repeat(2, axis=1))
    save("tiny.png", np.asarray(Image.fromarray(samples.astronaut()).resize((30, 20))))
    sys.path.insert(0, str(DATA.parent))
    from reference_models import save_tokenizer

    save_tokenizer(DATA / "tokenizer", 389)


def tiny_processor():
    """The reference Gemma4UnifiedProcessor over the tiny tokenizer, its media tokens named as Gemma 4's."""
    from transformers import (Gemma4UnifiedAudioFeatureExtractor, Gemma4UnifiedImageProcessor,
                              Gemma4UnifiedProcessor, Gemma4UnifiedVideoProcessor, PreTrainedTokenizerFast)

    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        str(DATA / "tokenizer"),
        extra_special_tokens={"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                              "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"},
    )
    return Gemma4UnifiedProcessor(
        feature_extractor=Gemma4UnifiedAudioFeatureExtractor(), image_processor=Gemma4UnifiedImageProcessor(),
        tokenizer=tokenizer, video_processor=Gemma4UnifiedVideoProcessor(),
    )


def make_reference(out: Path):
    import transformers
    from transformers import Gemma4UnifiedImageProcessor, Gemma4UnifiedVideoProcessor
    from transformers.video_utils import VideoMetadata

    arrays, notes = {}, {"transformers": transformers.__version__}
    for name in IMAGES:
        for budget in BUDGETS.get(name, (280,)):
            processor = Gemma4UnifiedImageProcessor(max_soft_tokens=budget)
            result = processor([Image.open(DATA / name)], return_tensors="np")
            key = f"{name}@{budget}"
            pixels = np.asarray(result["pixel_values"][0], dtype=np.float32)
            arrays[f"{key}:positions"] = np.asarray(result["image_position_ids"][0]).astype(np.int16)
            arrays[f"{key}:patch_sums"] = pixels.astype(np.float64).sum(-1)
            arrays[f"{key}:soft_tokens"] = np.array(result["num_soft_tokens_per_image"])
            notes[f"{key}:sha256"] = digest(pixels)

    frames = video_frames()
    metadata = VideoMetadata(total_num_frames=len(frames), fps=VIDEO_FPS, duration=len(frames) / VIDEO_FPS)
    video = Gemma4UnifiedVideoProcessor()(videos=[frames], video_metadata=[metadata], return_metadata=True,
                                          return_tensors="np")
    pixels = np.asarray(video["pixel_values_videos"], dtype=np.float32)
    arrays["video:positions"] = np.asarray(video["video_position_ids"]).astype(np.int16)
    arrays["video:patch_sums"] = pixels.astype(np.float64).sum(-1)
    arrays["video:frames_per_video"] = np.asarray(video["num_frames_per_video"])
    arrays["video:frame_indices"] = np.asarray(video["video_metadata"][0].frames_indices)
    notes["video:sha256"] = digest(pixels)
    notes["video:timestamps"] = list(video["video_metadata"][0].timestamps)

    processor = tiny_processor()
    text = "<bos>Look:<|image|> then<|image|>, hear<|audio|> and watch<|video|> now."
    full = processor(text=text, images=[[Image.open(DATA / "rocket.jpg"), Image.open(DATA / "tiny.png")]],
                     audio=[audio_clip()], videos=[frames], video_metadata=[metadata], return_tensors="np",
                     add_special_tokens=False)
    for name in ("input_ids", "mm_token_type_ids", "input_features_mask", "num_frames_per_video"):
        arrays[f"processor:{name}"] = np.asarray(full[name])
    notes["processor:pixel_values:sha256"] = digest(np.asarray(full["pixel_values"], dtype=np.float32))
    notes["processor:input_features:sha256"] = digest(np.asarray(full["input_features"], dtype=np.float32))
    arrays["notes"] = np.array(json.dumps(notes))
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "reference_arrays.npz", **arrays)
    print(json.dumps({k: v for k, v in notes.items() if not k.endswith("sha256")}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--make-inputs", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.make_inputs:
        make_inputs()
    if args.out:
        make_reference(args.out)
