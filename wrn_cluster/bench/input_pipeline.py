"""`wrn-cluster bench input`: training images per second per core, from JPEG files to the batch
the network sees.

Baseline: torchvision's ``ImageFolder`` with PIL and the classic transforms of the PyTorch
ImageNet example (RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize). Project:
``wrn_cluster.data.imagefolder`` as training uses it, plus the normalization the training step
does on the device (here the CPU, so it is charged to the project). Same files, same output
size, one thread, batches through a DataLoader with no worker processes, interleaved rounds,
timed in this process's CPU seconds: what one core does, whatever else shares the machine.

The files are real photographs, not synthetic patterns, which decode unrealistically fast:
random crops of scikit-learn's bundled sample photos, resized to ImageNet's typical 500x375
(or 375x500) and saved as JPEG quality 90.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from wrn_cluster.bench.common import Comparison, Say, Variant, interleave, quiet
from wrn_cluster.data import imagefolder
from wrn_cluster.spec import IMAGENET_MEAN_STD
from wrn_cluster.train.classify import normalization, to_input

JPEG_QUALITY = 90
# (width, height) of the written files, ImageNet's most common shapes, chosen at random.
SHAPES = ((500, 375), (500, 375), (500, 333), (375, 500))
BASELINE = (
    "torchvision ImageFolder + PIL: RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize"
)


def write_photo_jpegs(
    root: str | Path, count: int, seed: int = 0, quality: int = JPEG_QUALITY
) -> Path:
    """``count`` JPEGs as root/train/<photo>/NNNNN.jpg, and two per photo in root/val/."""
    from sklearn.datasets import load_sample_images

    root = Path(root)
    samples = load_sample_images()
    names = [Path(f).stem for f in samples.filenames]
    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", 2 * len(names))):
        for i in range(n):
            label = i % len(names)
            photo = samples.images[label]
            width, height = SHAPES[rng.integers(len(SHAPES))]
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            _crop_resized(photo, width, height, rng).save(folder / f"{i:05d}.jpg", quality=quality)
    return root


def _crop_resized(photo: np.ndarray, width: int, height: int, rng: np.random.Generator):
    """A random crop of ``photo`` with the target's aspect (half to all of the photo's extent),
    resized to width x height, mirrored half the time."""
    ph, pw = photo.shape[:2]
    fit = min(ph / height, pw / width)
    scale = fit * rng.uniform(0.5, 1.0)
    h, w = round(height * scale), round(width * scale)
    top, left = rng.integers(ph - h + 1), rng.integers(pw - w + 1)
    image = Image.fromarray(photo[top : top + h, left : left + w])
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def _baseline_loader(root: Path, size: int, batch: int) -> DataLoader:
    from torchvision import datasets, transforms

    mean, std = IMAGENET_MEAN_STD
    classic = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    dataset = datasets.ImageFolder(str(root / "train"), transform=classic)
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0)


def run(
    images: int = 256,
    size: int = 224,
    batch: int = 32,
    rounds: int = 5,
    folder: str | Path | None = None,
    seed: int = 0,
    say: Say = quiet,
) -> Comparison:
    """Images per second per core of both pipelines over the same JPEG folder.

    ``folder`` may name an existing imagefolder (train/<class>/*.jpg and val/); left out, the
    bench writes ``images`` photo JPEGs to a temporary folder.
    """

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: the decoders are single-threaded, keep torch so too
    try:
        with tempfile.TemporaryDirectory(prefix="wrn-bench-input-") as scratch:
            root = Path(folder) if folder else write_photo_jpegs(scratch, images, seed)
            if not folder:
                say(f"wrote {images} photo JPEGs to {root}")
            baseline = _baseline_loader(root, size, batch)
            train, _, _ = imagefolder.build(
                str(root), size, round(size / 0.875), augment=True, seed=seed
            )
            project = DataLoader(train, batch_size=batch, shuffle=True, num_workers=0)
            device = torch.device("cpu")
            scale, shift = normalization(IMAGENET_MEAN_STD, device)
            epoch = [0]
            normalize_s: list[float] = []  # per round: the part a GPU would do instead

            def run_baseline() -> int:
                done = 0
                for pixels, _ in baseline:
                    done += len(pixels)
                return done

            def run_project() -> int:
                epoch[0] += 1
                train.set_epoch(epoch[0])
                done, normalizing = 0, 0.0
                for pixels, _ in project:
                    start = time.process_time()
                    to_input(pixels, device, scale, shift)
                    normalizing += time.process_time() - start
                    done += len(pixels)
                normalize_s.append(normalizing)
                return done

            runs = {"baseline": run_baseline, "project": run_project}
            interleave(runs, 1)  # warm-up: file cache, first-call costs
            del normalize_s[:]
            rates = interleave(runs, rounds, say, clock=time.process_time)
            count = len(train)
    finally:
        torch.set_num_threads(threads)
    # Images/s of the loader alone: the project's per-core cost where the device is a GPU.
    loader_only = [
        count / (count / rate - seconds)
        for rate, seconds in zip(rates["project"], normalize_s, strict=True)
    ]
    loader_ratio = statistics.median(loader_only) / statistics.median(rates["baseline"])
    return Comparison(
        bench="input",
        unit="img/s/core",
        baseline=Variant("baseline", BASELINE, rates["baseline"]),
        project=Variant(
            "project",
            "wrn_cluster.data.imagefolder (uint8 throughout) + normalize in the step",
            rates["project"],
        ),
        extra={
            "project_loader_only_img_s": round(statistics.median(loader_only), 2),
            "loader_only_ratio": round(loader_ratio, 3),
        },
        notes=[
            "rates are images per CPU-second of this one-thread process: what one core does, "
            "whatever else runs on the machine",
            "the ratio charges the project for normalizing on the CPU; loader_only_ratio leaves "
            "that out, as on a GPU node, where the step normalizes on the GPU",
        ],
        settings={
            "images": count,
            "size": size,
            "batch": batch,
            "rounds": rounds,
            "folder": str(folder) if folder else "photo JPEGs ~500x375, quality 90",
            "threads": 1,
        },
    )
