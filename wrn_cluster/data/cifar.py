"""CIFAR-10/100 (the python-pickle releases) and SVHN (the cropped-digit .mat files), in memory.

Each release is a handful of files under data.url, read once through fsspec; the URL may also be
the folder holding the extracted release folder (``cifar-10-batches-py``, ``cifar-100-python``).
The validation set is the test set, as in the paper.
"""

from __future__ import annotations

import io
import logging
import pickle
from typing import Any

import fsspec
import numpy as np
import torch
from torch.utils.data import Dataset

from wrn_cluster.data.base import DataError
from wrn_cluster.data.storage import filesystem, join
from wrn_cluster.data.transforms import (
    Augment,
    PadCropFlip,
    Policy,
    SharedEpoch,
    item_generator,
    source_index,
)

log = logging.getLogger(__name__)

FILES = {
    "cifar10": [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"],
    "cifar100": ["train", "test", "meta"],
    "svhn": ["train_32x32.mat", "test_32x32.mat"],
}
RELEASE_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
WHERE_TO_GET = {
    "cifar10": "extract cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html",
    "cifar100": "extract cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html",
    "svhn": "download the cropped-digit files from http://ufldl.stanford.edu/housenumbers/",
}
SVHN_EXTRA = "extra_32x32.mat"


def locate(dataset: str, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fs, folder holding the release files); raises DataError naming the first missing file."""
    fs, root = filesystem(url)
    if not fs.exists(root):
        raise DataError(
            f"{url}: no such dataset folder; check data.url, or {WHERE_TO_GET[dataset]} there"
        )
    candidates = [root]
    if dataset in RELEASE_FOLDER:
        candidates.append(join(root, RELEASE_FOLDER[dataset]))
    for folder in candidates:
        if all(fs.isfile(join(folder, name)) for name in FILES[dataset]):
            return fs, folder
    missing = [name for name in FILES[dataset] if not fs.isfile(join(root, name))]
    more = f" (and {len(missing) - 1} more of {', '.join(FILES[dataset])})" if missing[1:] else ""
    raise DataError(f"{url}/{missing[0]}: missing{more}; {WHERE_TO_GET[dataset]} into {url}")


def _unpickle(fs: fsspec.AbstractFileSystem, folder: str, name: str, url: str) -> dict:
    with fs.open(join(folder, name), "rb") as file:
        data = file.read()
    try:
        return pickle.loads(data, encoding="bytes")
    except Exception as error:  # a damaged pickle can raise almost anything
        raise DataError(
            f"{url}/{name}: not a CIFAR python-pickle file ({error}); download it again"
        ) from None


def _cifar_batch(batch: dict, label_key: bytes, url: str, name: str) -> tuple[np.ndarray, list]:
    try:
        return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), batch[label_key]
    except (KeyError, ValueError) as error:
        raise DataError(
            f"{url}/{name}: not a CIFAR batch (no 3x32x32 data or {label_key.decode()}: "
            f"{error}); download it again"
        ) from None


def _load_cifar(dataset: str, url: str) -> tuple[tuple, tuple, list[str]]:
    fs, folder = locate(dataset, url)
    if dataset == "cifar10":
        train_files, test_files, label_key = FILES["cifar10"][:5], ["test_batch"], b"labels"
        names_key, meta = b"label_names", _unpickle(fs, folder, "batches.meta", url)
    else:
        train_files, test_files, label_key = ["train"], ["test"], b"fine_labels"
        names_key, meta = b"fine_label_names", _unpickle(fs, folder, "meta", url)

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_cifar_batch(_unpickle(fs, folder, n, url), label_key, url, n) for n in files]
        images = np.concatenate([images for images, _ in parts])
        labels = np.concatenate([np.asarray(labels, dtype=np.int64) for _, labels in parts])
        return images, labels

    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    return read(train_files), read(test_files), classes


def _load_svhn_file(fs: fsspec.AbstractFileSystem, folder: str, name: str, url: str) -> tuple:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    data = fs.cat_file(join(folder, name))
    try:
        mat = loadmat(io.BytesIO(data))
        images = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1))
        labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    except (MatReadError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{url}/{name}: not an SVHN .mat file with X [32,32,3,N] and y [N,1] ({error}); "
            "download it again"
        ) from None
    labels[labels == 10] = 0  # SVHN writes digit 0 as label 10
    return images, labels


def _load_svhn(url: str) -> tuple[tuple, tuple, list[str]]:
    fs, folder = locate("svhn", url)
    train = [_load_svhn_file(fs, folder, "train_32x32.mat", url)]
    if fs.isfile(join(folder, SVHN_EXTRA)):
        log.info("SVHN: training on %s too (the paper's 604k-image training set)", SVHN_EXTRA)
        train.append(_load_svhn_file(fs, folder, SVHN_EXTRA, url))
    images = np.concatenate([images for images, _ in train])
    labels = np.concatenate([labels for _, labels in train])
    test = _load_svhn_file(fs, folder, "test_32x32.mat", url)
    return (images, labels), test, [str(digit) for digit in range(10)]


class ImageTensors(Dataset):
    """In-memory uint8 [N, 3, 32, 32] images; training items drawn through ``augment``, then
    ``policy``. With ``repeats``, index ``c * N + i`` is copy c of item i (``source_index``)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        augment: Augment | None,
        seed: int,
        policy: Policy | None = None,
        repeats: int = 1,
    ) -> None:
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)
        self.augment = augment
        self.seed = seed
        self.policy = policy or None
        self.repeats = repeats
        self.shared_epoch = SharedEpoch()

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.set(epoch)

    @property
    def epoch(self) -> int:
        return int(self.shared_epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        source = source_index(index, len(self), self.repeats)
        image = self.images[source]
        if self.augment is not None or self.policy is not None:
            generator = item_generator(self.seed, self.epoch, index)
            if self.augment is not None:
                image = self.augment(image, generator)
            if self.policy is not None:
                image = self.policy(image, generator)
        return image, int(self.labels[source])


def load(dataset: str, url: str) -> tuple[tuple, tuple, list[str]]:
    """((train images, labels), (val images, labels), class names): uint8 [N, 3, 32, 32] and
    int64 [N] arrays of the release at ``url``."""
    return _load_svhn(url) if dataset == "svhn" else _load_cifar(dataset, url)


def build(
    dataset: str,
    url: str,
    augment: bool,
    seed: int,
    *,
    policy: Policy | None = None,
    repeats: int = 1,
) -> tuple[ImageTensors, ImageTensors, list[str]]:
    """(train, val, class names); validation images are the release's 32x32 pixels as they are
    (there is no evaluation crop to choose for them)."""
    loaded: Any = load(dataset, url)
    (train_images, train_labels), (val_images, val_labels), classes = loaded
    view = PadCropFlip(4) if augment else None
    return (
        ImageTensors(train_images, train_labels, view, seed, policy, repeats),
        ImageTensors(val_images, val_labels, None, seed),
        classes,
    )


def check(dataset: str, url: str) -> None:
    """Fast: the release files are there (nothing is read)."""
    locate(dataset, url)
