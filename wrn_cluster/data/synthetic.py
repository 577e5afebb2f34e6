"""Synthetic, learnable JPEG datasets in the imagefolder layout, for quickstarts and tests.

Each class has its own foreground and background colour and stripe direction; images vary by
stripe phase and period, a shifted blob, brightness, small hue jitter and pixel noise. Colour
survives any crop and flip, so a small CNN separates the classes within a few epochs at 32px.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image

from wrn_cluster.data.storage import filesystem, join

JPEG_QUALITY = 90


def class_names(classes: int) -> list[str]:
    width = max(2, len(str(classes - 1)))
    return [f"class_{c:0{width}d}" for c in range(classes)]


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255


def synthetic_image(label: int, classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [size, size, 3] image of class ``label``."""
    # Jitter stays under a quarter of the gap between class hues, so colours never overlap.
    hue = label / classes + rng.uniform(-0.2, 0.2) / classes
    foreground = _rgb(hue, 0.9, 0.95)
    background = _rgb(hue + 0.5, 0.5, 0.3)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = np.pi * label / classes
    period = rng.uniform(0.2, 0.35)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(
        2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase
    )
    # A blob whose home position depends on the class, shifted a little per image.
    centre = 0.5 + 0.25 * np.array(
        [np.cos(2 * np.pi * label / classes), np.sin(2 * np.pi * label / classes)]
    )
    centre += rng.uniform(-0.1, 0.1, size=2)
    blob = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 < 0.15**2).astype(np.float32)
    mix = np.clip(0.7 * stripes + blob, 0.0, 1.0)[..., None]
    image = (background + (foreground - background) * mix) * rng.uniform(0.8, 1.1)
    image += rng.normal(0.0, 12.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_imagefolder(
    dest_url: str,
    classes: int,
    per_class: int,
    size: int,
    val_fraction: float = 0.25,
    seed: int = 0,
) -> dict:
    """Write dest/train/<class>/*.jpg and dest/val/<class>/*.jpg; return the counts written.

    The same arguments always write the same bytes. Each class keeps at least one image in each
    split.
    """
    if classes < 2 or per_class < 2 or size < 8 or not 0.0 < val_fraction < 1.0:
        raise ValueError(
            "need classes >= 2, per_class >= 2, size >= 8 and 0 < val_fraction < 1; got "
            f"{classes}, {per_class}, {size}, {val_fraction}"
        )
    fs, root = filesystem(dest_url)
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64]))
    per_val = min(max(1, round(per_class * val_fraction)), per_class - 1)
    files: dict[str, bytes] = {}
    for label, name in enumerate(class_names(classes)):
        for i in range(per_class):
            split = "val" if i < per_val else "train"
            files[join(root, split, name, f"{i:05d}.jpg")] = _jpeg(
                synthetic_image(label, classes, size, rng)
            )
    for folder in sorted({path.rsplit("/", 1)[0] for path in files}):
        fs.makedirs(folder, exist_ok=True)
    fs.pipe(files)  # one call: concurrent uploads on S3
    fs.invalidate_cache(root)
    return {
        "classes": classes,
        "train": classes * (per_class - per_val),
        "val": classes * per_val,
    }
