"""Image transforms on uint8 [3, H, W] tensors, with every random choice drawn from a generator.

Training items are augmented from ``item_generator(seed, epoch, index)``, so an item looks the
same whatever the DataLoader worker count, the worker it lands on, or the number of DDP ranks.
Normalization is left to the training loop, which does it on the device.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

# An augmentation: (image, generator) -> image; classes, not closures, so datasets pickle.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, epoch, index) alone."""
    # SeedSequence mixes the three well; a plain sum would give (epoch 1, item 0) = (0, 1).
    words = [seed % 2**64, epoch % 2**64, index % 2**64]
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]))
    return generator


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, high: int) -> int:
    """An int in [0, high]."""
    return int(torch.randint(0, high + 1, (), generator=generator).item())


def random_resized_crop_box(
    height: int, width: int, generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop chooses it, from ``generator``."""
    area = height * width
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *RRC_SCALE)
        ratio = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target_area * ratio))
        h = round(math.sqrt(target_area / ratio))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, height - h), _randint(generator, width - w), h, w
    # Fallback, as torchvision: the centre crop with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < RRC_RATIO[0]:
        w, h = width, round(width / RRC_RATIO[0])
    elif in_ratio > RRC_RATIO[1]:
        h, w = height, round(height * RRC_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_flip(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror left-right with probability 1/2."""
    if torch.rand((), generator=generator).item() < 0.5:
        return F.horizontal_flip(image)
    return image


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """ImageNet-style training view: a random area/aspect crop resized to size, then a flip."""

    size: int

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], generator)
        image = F.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
        return random_flip(image, generator)


@dataclass(frozen=True)
class PadCropFlip:
    """The paper's CIFAR augmentation: reflect-pad, a random crop of the original size, a flip."""

    pad: int = 4

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        height, width = image.shape[-2:]
        padded = F.pad(image, [self.pad], padding_mode="reflect")
        top, left = _randint(generator, 2 * self.pad), _randint(generator, 2 * self.pad)
        return random_flip(padded[:, top : top + height, left : left + width], generator)


def resize_center_crop(image: torch.Tensor, resize: int, size: int) -> torch.Tensor:
    """Evaluation view: shorter side to ``resize``, then the centre ``size`` x ``size``."""
    image = F.resize(image, [resize], antialias=True)
    return F.center_crop(image, [size, size])


def decode(data: bytes, min_side: int | None = None) -> torch.Tensor:
    """JPEG/PNG bytes to uint8 RGB [3, H, W]; raises on a corrupt or unreadable image.

    With ``min_side``, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale as long as both sides stay
    at least ``min_side`` (PIL draft mode: much faster for large photos; the crop is resized
    to at most ``min_side`` afterwards anyway).
    """
    with Image.open(io.BytesIO(data)) as image:
        if min_side:
            image.draft("RGB", (min_side, min_side))
        rgb = image.convert("RGB")
    return F.pil_to_tensor(rgb)
