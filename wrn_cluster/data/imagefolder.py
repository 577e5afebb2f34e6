"""ImageNet-style folders, local or on S3: ``<url>/train/<class>/*.jpg``, ``<url>/val/<class>/*``.

Classes are the sorted folder names of train/; val/ uses the same list. Listing is one recursive
listing per split (one paged LIST on S3), so checking a dataset decodes nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from torch.utils.data import Dataset

from wrn_cluster.data.base import DataError
from wrn_cluster.data.storage import PerProcessFilesystem, filesystem, join
from wrn_cluster.data.transforms import (
    Policy,
    RandomResizedCropFlip,
    SharedEpoch,
    source_index,
    training_image,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LAYOUT = "train/<class>/*.jpg and val/<class>/*.jpg"


@dataclass
class SplitIndex:
    """The images of one split: paths relative to the split folder, and their class labels."""

    paths: np.ndarray  # fixed-width bytes, so DataLoader workers share it without refcount copies
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _subfolders(fs: fsspec.AbstractFileSystem, url: str, path: str) -> list[str]:
    names = []
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] == "directory" and not name.startswith("."):
            names.append(name)
            _check_class_name(url, path, name)
    return sorted(names)


def _check_class_name(url: str, path: str, name: str) -> None:
    """Class names travel to MLflow, JSON and the model's metadata, which hold UTF-8 only."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        # os.fsencode gives back the folder's raw bytes; show them escaped, printable anywhere.
        shown = os.fsencode(name).decode("utf-8", "backslashreplace")
        split = path.rstrip("/").rsplit("/", 1)[-1]
        raise DataError(
            f"{url}/{split}/{shown}: this class folder's name is not UTF-8; rename it (class "
            "names are stored in MLflow and in the model)"
        ) from None


def _scan_split(
    fs: fsspec.AbstractFileSystem, url: str, root: str, split: str, classes: list[str] | None
) -> tuple[list[str], SplitIndex]:
    split_root = join(root, split)
    if not fs.isdir(split_root):
        raise DataError(
            f"{url}: no {split}/ folder; an imagefolder dataset holds {LAYOUT}, so add "
            f"{split}/ with one subfolder of images per class"
        )
    folders = _subfolders(fs, url, split_root)
    if classes is None:
        classes = folders
        if not classes:
            raise DataError(
                f"{url}/{split}: no class folders; put each class's images in its own "
                f"subfolder, e.g. {split}/cat/0001.jpg"
            )
    else:
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise DataError(
                f"{url}/{split}/{unknown[0]}: class {unknown[0]!r} is not in train/; "
                f"{split}/ must use train/'s class folders ({len(unknown)} unknown)"
            )
    label_of = {name: label for label, name in enumerate(classes)}
    prefix = split_root.rstrip("/") + "/"
    paths: list[str] = []
    labels: list[int] = []
    for path in sorted(fs.find(split_root, withdirs=False, detail=False)):
        relative = path[len(prefix) :] if path.startswith(prefix) else path
        folder, _, rest = relative.partition("/")
        if rest and folder in label_of and relative.lower().endswith(IMAGE_EXTENSIONS):
            paths.append(relative)
            labels.append(label_of[folder])
    found = set(labels)
    for name in folders:
        if label_of[name] not in found:
            raise DataError(
                f"{url}/{split}/{name}: no {', '.join(IMAGE_EXTENSIONS)} images in this class "
                "folder; add images or remove the folder"
            )
    # os.fsencode keeps any file name, also one that is not UTF-8 (surrogate-escaped on Linux).
    encoded = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
    index = SplitIndex(encoded, np.array(labels, dtype=np.int64))
    return classes, index


def scan(url: str) -> tuple[list[str], SplitIndex, SplitIndex]:
    """(class names, train index, val index); raises DataError naming what is missing."""
    fs, root = filesystem(url)
    if not fs.exists(root):
        raise DataError(
            f"{url}: no such dataset folder; set data.url to a folder holding {LAYOUT}, "
            "or add data.synthesize to write a synthetic dataset there"
        )
    classes, train = _scan_split(fs, url, root, "train", None)
    _, val = _scan_split(fs, url, root, "val", classes)
    return classes, train, val


def is_missing_or_empty(url: str) -> bool:
    fs, root = filesystem(url)
    return not fs.exists(root) or not fs.ls(root)


class ImageFolder(Dataset):
    """(uint8 [3, size, size], label) items; an unreadable image gives (zeros, -1). A training
    split with ``repeats`` also serves index ``c * len + i``: copy c of item i (source_index)."""

    def __init__(
        self,
        url: str,
        split: str,
        index: SplitIndex,
        size: int,
        eval_resize: int,
        augment: bool,
        seed: int,
        policy: Policy | None = None,
        repeats: int = 1,
    ) -> None:
        self.url = url
        self.split = split
        self.index = index
        self.size = size
        self.eval_resize = eval_resize
        self.augment = RandomResizedCropFlip(size) if augment else None
        self.seed = seed
        self.policy = policy or None
        self.repeats = repeats
        self.shared_epoch = SharedEpoch()
        self.files = PerProcessFilesystem(url)
        root = filesystem(url)[1]
        self.split_root = join(root, split)

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.set(epoch)

    @property
    def epoch(self) -> int:
        return int(self.shared_epoch)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self.files.get()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        source = source_index(index, len(self), self.repeats)
        path = join(self.split_root, os.fsdecode(self.index.paths[source]))
        image = None
        try:
            data = self.fs.cat_file(path)
            item = (self.seed, self.epoch, index)
            image = training_image(
                data, self.augment, item, self.eval_resize, self.size, self.policy
            )
        except Exception as error:  # a bad file must not stop a long run; the loop counts it
            log.warning("skipping unreadable image %s: %s", path, error)
        if image is None:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1
        return image, int(self.index.labels[source])


def build(
    url: str,
    size: int,
    eval_resize: int,
    augment: bool,
    seed: int,
    *,
    eval_size: int | None = None,
    policy: Policy | None = None,
    repeats: int = 1,
) -> tuple[ImageFolder, ImageFolder, list[str]]:
    """(train, val, class names): training views of ``size`` (then ``policy``, in ``repeats``
    copies), validation centre crops of ``eval_size`` (``size`` if None) after a resize of the
    shorter side to ``eval_resize``."""
    classes, train, val = scan(url)
    eval_size = eval_size or size
    # Training without augmentation takes the evaluation view at its own size, same proportions.
    train_resize = round(eval_resize * size / eval_size)
    return (
        ImageFolder(url, "train", train, size, train_resize, augment, seed, policy, repeats),
        ImageFolder(url, "val", val, eval_size, eval_resize, False, seed),
        classes,
    )
