"""Image transforms on uint8 [3, H, W] tensors, with every random choice drawn from a generator.

Training items are augmented from ``item_generator(seed, epoch, index)``, so an item looks the
same whatever the DataLoader worker count, the worker it lands on, or the number of DDP ranks.
A recipe's ``Policy`` (TrivialAugment or RandAugment, random erasing) runs after the reader's
view, seeded from that same generator. Normalization is left to the training step, which does it
on the device.

JPEGs decode through libjpeg-turbo (simplejpeg), at 1/2, 1/4 or 1/8 scale wherever the view still
gets twice the pixels it needs; other formats, and JPEGs libjpeg-turbo refuses, through PIL.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.transforms import v2
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


def source_index(index: int, size: int, repeats: int = 1) -> int:
    """The item that training index ``index`` of a split of ``size`` reads. Repeated
    augmentation (train/order.py) asks for copy c of item i as index ``c * size + i``: it reads
    item i and draws its augmentation from the generator of ``c * size + i``, so copies differ."""
    if index < size:
        return index
    if index >= repeats * size:
        raise IndexError(f"index {index} is past {repeats} copies of {size} items")
    return index % size


class SharedEpoch:
    """The epoch number in shared memory, so DataLoader workers that persist from one epoch to
    the next (forked or spawned before ``set``) draw from the epoch the loop set last."""

    def __init__(self) -> None:
        self._value = torch.zeros((), dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self._value.fill_(epoch)

    def __int__(self) -> int:
        return int(self._value)


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

    def decoded(self, data: bytes, generator: torch.Generator) -> torch.Tensor:
        """The view of an encoded image, as ``self(decode(data), generator)``, but a JPEG is
        decoded at the smallest 1/2^k scale whose crop still spans ``2 * size`` pixels."""
        shape = jpeg_shape(data)
        if shape is None:
            return self(decode(data), generator)
        top, left, h, w = random_resized_crop_box(*shape, generator)
        factor = reduction(min(h, w), self.size)
        image = decode_jpeg(data, shape, factor)
        height, width = image.shape[-2:]
        if (height, width) != shape:  # decoded smaller: the same box in its pixels
            top, left = top * height // shape[0], left * width // shape[1]
            h = min(max(1, round(h * height / shape[0])), height - top)
            w = min(max(1, round(w * width / shape[1])), width - left)
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


POLICIES = {"trivial_augment": v2.TrivialAugmentWide, "rand_augment": v2.RandAugment}


@dataclass(frozen=True)
class Policy:
    """A recipe's augmentation of a training view (uint8 [3, H, W]): ``name``'s policy
    (TrivialAugmentWide or RandAugment), then RandomErasing with probability
    ``random_erasing``, filling with ``erase_value``, all torchvision.transforms.v2's.

    They draw from torch's global RNG, so each image runs them in a fork of it, seeded from the
    image's own generator: the result is a function of (seed, epoch, index) and the loader
    process's global stream is left as it was."""

    name: str = "none"  # "none", or a key of POLICIES
    random_erasing: float = 0.0
    # torchvision's recipe erases to 0 after normalization, i.e. to the mean pixel.
    erase_value: tuple[int, int, int] = (0, 0, 0)

    def __bool__(self) -> bool:
        return self.name != "none" or self.random_erasing > 0

    @cached_property
    def transform(self) -> v2.Transform:
        steps: list[v2.Transform] = []
        if self.name != "none":
            # As torchvision's references/classification (--interpolation bilinear) build it.
            steps.append(POLICIES[self.name](interpolation=v2.InterpolationMode.BILINEAR))
        if self.random_erasing:
            steps.append(v2.RandomErasing(p=self.random_erasing, value=list(self.erase_value)))
        return v2.Compose(steps)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self:
            return image
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            # Not torch.manual_seed: it would reseed the CUDA generators too, which fork_rng
            # does not restore, and a loader without worker processes runs in the training one.
            torch.default_generator.manual_seed(seed)
            return self.transform(image)


def resize_center_crop(image: torch.Tensor, resize: int, size: int) -> torch.Tensor:
    """Evaluation view: shorter side to ``resize``, then the centre ``size`` x ``size``."""
    image = F.resize(image, [resize], antialias=True)
    return F.center_crop(image, [size, size])


def check_pixels(height: int, width: int) -> None:
    """Refuse an image larger than PIL's decompression-bomb limit before decoding it: a small
    file can declare 20000x20000 pixels, 1.2 GB once decoded."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and height * width > limit:
        raise Image.DecompressionBombError(
            f"{width}x{height} pixels is over the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)"
        )


def jpeg_shape(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's header, without decoding; None if it is no JPEG.
    Raises DecompressionBombError for one over the pixel limit."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    check_pixels(height, width)
    return height, width


def reduction(side: int, min_side: int | None) -> int:
    """The largest of 1, 2, 4, 8 that keeps ``side / factor`` at least ``2 * min_side``."""
    # The margin leaves the antialiased resize at least a 2x reduction to do, so the view
    # matches a full-size decode (a JPEG's 1/8 scale alone is a coarse box filter).
    factor = 1
    while min_side and factor < 8 and side >= 4 * factor * min_side:
        factor *= 2
    return factor


def decode_jpeg(data: bytes, shape: tuple[int, int], factor: int = 1) -> torch.Tensor:
    """A JPEG at 1/factor scale as uint8 [3, H, W] (a view of HWC memory, which the resize
    kernels read fastest); libjpeg-turbo's refusals fall back to PIL, which raises if corrupt."""
    height, width = shape
    try:
        # DCT-domain scaling: 1/2 is the scale at which output is at least half of each side.
        pixels = simplejpeg.decode_jpeg(
            data, "RGB", min_height=-(-height // factor), min_width=-(-width // factor)
        )
    except ValueError:  # CMYK, or data libjpeg-turbo warns about: let PIL decide
        return _decode_pil(data, min(height, width) // factor if factor > 1 else None)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def decode(data: bytes, min_side: int | None = None) -> torch.Tensor:
    """JPEG/PNG bytes to uint8 RGB [3, H, W]; raises on a corrupt or unreadable image.

    With ``min_side``, a JPEG is decoded at 1/2, 1/4 or 1/8 scale as long as both sides stay at
    least ``2 * min_side`` (much faster for large photos; the view is resized to at most
    ``min_side`` afterwards anyway).
    """
    shape = jpeg_shape(data)
    if shape is None:
        return _decode_pil(data, min_side)
    return decode_jpeg(data, shape, reduction(min(shape), min_side))


def _decode_pil(data: bytes, min_side: int | None) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:  # raises itself above twice the limit
        check_pixels(image.height, image.width)
        if min_side:
            image.draft("RGB", (min_side, min_side))
        rgb = image.convert("RGB")
    return F.pil_to_tensor(rgb)


def training_image(
    data: bytes,
    augment: RandomResizedCropFlip | None,
    item: tuple[int, int, int],
    eval_resize: int,
    size: int,
    policy: Policy | None = None,
) -> torch.Tensor | None:
    """An encoded image as a model input of ``size``: augmented from the generator of ``item``
    (seed, epoch, index), or resized and centre-cropped for evaluation, then ``policy``'s
    augmentation (from the same generator) if any; None if it does not decode (the caller
    counts it)."""
    try:
        if augment is None:
            image = resize_center_crop(decode(data, eval_resize), eval_resize, size)
            return policy(image, item_generator(*item)) if policy else image
        generator = item_generator(*item)
        image = augment.decoded(data, generator)
        return policy(image, generator) if policy else image
    except Exception:  # a bad file must not stop a long run: PIL and libjpeg raise many kinds
        return None
