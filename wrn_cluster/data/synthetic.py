"""Synthetic, learnable JPEG datasets for quickstarts and tests: classes in the imagefolder
layout, and shapes with boxes in COCO format (``write_coco``).

Imagefolder: each class has its own foreground and background colour and stripe direction;
images vary by stripe phase and period, a shifted blob, brightness, small hue jitter and pixel
noise. Colour survives any crop and flip, so a small CNN separates the classes within a few
epochs at 32px. COCO shapes: see ``write_coco``.
"""

from __future__ import annotations

import colorsys
import io
import json
import math

import numpy as np
from PIL import Image

from wrn_cluster.data.storage import filesystem, join
from wrn_cluster.spec.datasets import COCO_LAYOUT

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


def train_per_class(per_class: int, val_fraction: float) -> int:
    """Images of each class that go to train/ (the rest go to val/, at least one each)."""
    return per_class - min(max(1, round(per_class * val_fraction)), per_class - 1)


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
    per_val = per_class - train_per_class(per_class, val_fraction)
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


# ---------------------------------------------------------------------------------------------
# Shapes in COCO format, for detection tests and the detection quickstart

# Ids with gaps, as COCO's have, so the label <-> category mapping is exercised.
SHAPES = ((1, "rectangle"), (3, "ellipse"), (7, "triangle"))


def _shape_image(
    width: int, height: int, rng: np.random.Generator, empty: bool
) -> tuple[np.ndarray, list[dict]]:
    """A noisy two-tone background with 1-3 filled shapes (none if ``empty``) that barely
    overlap; each shape's class has its own hue band, each image its own size and position."""
    from PIL import ImageDraw

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    tones = [_rgb(rng.uniform(), rng.uniform(0.1, 0.4), rng.uniform(0.15, 0.45)) for _ in "ab"]
    mix = (x / width * 0.5 + y / height * 0.5)[..., None]
    background = tones[0] + (tones[1] - tones[0]) * mix
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    objects: list[dict] = []
    short = min(width, height)
    for _ in range(0 if empty else int(rng.integers(1, 4))):
        for _attempt in range(20):
            w, h = (int(v) for v in rng.uniform(0.22, 0.5, size=2) * short)
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_iou(box, other["box"]) < 0.05 for other in objects):
                break
        else:
            continue
        kind = int(rng.integers(0, len(SHAPES)))
        colour = tuple(
            int(v) for v in _rgb(kind / len(SHAPES) + rng.uniform(-0.05, 0.05), 0.85, 0.95)
        )
        # PIL fills pixels x0..x1 inclusive, so the box [x0, x0 + w) is drawn to x0 + w - 1.
        inner = (x0, y0, x0 + w - 1, y0 + h - 1)
        if kind == 0:
            draw.rectangle(inner, fill=colour)
            area = float(w * h)
            polygon = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
        elif kind == 1:
            draw.ellipse(inner, fill=colour)
            area = math.pi * w * h / 4
            angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            points = np.stack(
                [x0 + w / 2 * (1 + np.cos(angles)), y0 + h / 2 * (1 + np.sin(angles))], axis=1
            )
            polygon = [round(float(v), 2) for v in points.reshape(-1)]
        else:
            corners = [(x0, y0 + h - 1), (x0 + w - 1, y0 + h - 1), (x0 + (w - 1) / 2, y0)]
            draw.polygon(corners, fill=colour)
            area = w * h / 2
            polygon = [x0, y0 + h, x0 + w, y0 + h, x0 + w / 2, y0]
        objects.append({"box": box, "kind": kind, "area": area, "polygon": polygon})
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0.0, 6.0, size=(height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), objects


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def write_coco(
    dest_url: str,
    images: int,
    size: int,
    val_fraction: float = 0.25,
    seed: int = 0,
    layout: tuple[str, str, str, str] = COCO_LAYOUT,
) -> dict:
    """Write shapes as a COCO dataset: JPEGs whose longer side is ``size`` (square, wide and
    tall), and instances JSON for train and val at ``layout`` (train JSON, val JSON, train
    images, val images; COCO 2017's names by default). The same arguments write the same bytes.
    About one training image in ten has no shapes."""
    if images < 2 or size < 32 or not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"need images >= 2, size >= 32 and 0 < val_fraction < 1; got {images}, {size}, "
            f"{val_fraction}"
        )
    fs, root = filesystem(dest_url)
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, 2017]))
    n_val = min(max(1, round(images * val_fraction)), images - 1)
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in SHAPES]
    docs = {
        split: {
            "info": {"description": "wrn-cluster synthetic shapes", "version": "1"},
            "images": [],
            "annotations": [],
            "categories": categories,
        }
        for split in ("train", "val")
    }
    files: dict[str, bytes] = {}
    short = round(size * 0.75)
    for i in range(images):
        split = "val" if i < n_val else "train"
        width, height = [(size, size), (size, short), (short, size)][int(rng.integers(0, 3))]
        empty = split == "train" and rng.uniform() < 0.1
        pixels, objects = _shape_image(width, height, rng, empty)
        file_name = f"{i:06d}.jpg"
        folder = layout[2] if split == "train" else layout[3]
        files[join(root, folder, file_name)] = _jpeg(pixels)
        doc = docs[split]
        doc["images"].append(
            {"id": i + 1, "file_name": file_name, "width": width, "height": height}
        )
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            doc["annotations"].append(
                {
                    "id": len(docs["train"]["annotations"]) + len(docs["val"]["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": SHAPES[obj["kind"]][0],
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": round(obj["area"], 2),
                    "iscrowd": 0,
                    "segmentation": [obj["polygon"]],
                }
            )
    for split, path in (("train", layout[0]), ("val", layout[1])):
        files[join(root, path)] = json.dumps(docs[split]).encode()
    for folder in sorted({path.rsplit("/", 1)[0] for path in files}):
        fs.makedirs(folder, exist_ok=True)
    fs.pipe(files)
    fs.invalidate_cache(root)
    return {
        "train": len(docs["train"]["images"]),
        "val": len(docs["val"]["images"]),
        "boxes": len(docs["train"]["annotations"]) + len(docs["val"]["annotations"]),
        "categories": len(SHAPES),
    }
