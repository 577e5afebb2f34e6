"""Real dataset files for tests: sklearn's bundled digits as an imagefolder, and CIFAR-10,
CIFAR-100 and SVHN releases in their published formats (python pickles, .mat).

Every helper writes to a local folder and returns what it wrote, so tests can compare pixels.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 handwritten 8x8 digits as uint8 RGB [N, size, size, 3], and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = np.stack(
        [
            np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR).convert("RGB"))
            for g in gray
        ]
    )
    return images, bunch.target.astype(np.int64)


def _split(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def write_digits_imagefolder(root: str | Path, size: int = 32) -> dict:
    """root/{train,val}/<digit>/<n>.jpg, a fixed 80/20 split; returns counts and class names."""
    root = Path(root)
    images, labels = digits(size)
    train, val = _split(len(labels))
    for split, indices in (("train", train), ("val", val)):
        for i in indices:
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.jpg", quality=95)
    return {"classes": [str(d) for d in range(10)], "train": len(train), "val": len(val)}


def _cifar_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n digits as CIFAR rows: uint8 [n, 3072] in channel-major (R plane, G plane, B plane)."""
    images, labels = digits(32)
    pick = np.random.default_rng(seed).choice(len(labels), size=n, replace=n > len(labels))
    return images[pick].transpose(0, 3, 1, 2).reshape(n, 3072), labels[pick]


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(obj, file, protocol=2)


def write_cifar10(root: str | Path, per_batch: int) -> dict:
    """data_batch_1..5, test_batch, batches.meta, as the python release holds them (bytes keys)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written: dict = {"classes": DIGIT_NAMES}
    for i, name in enumerate([*(f"data_batch_{b}" for b in range(1, 6)), "test_batch"]):
        data, labels = _cifar_images(per_batch, seed=i)
        _pickle(
            root / name,
            {
                b"batch_label": name.encode(),
                b"labels": labels.tolist(),
                b"data": data,
                b"filenames": [f"{name}_{j}.png".encode() for j in range(per_batch)],
            },
        )
        written[name] = (data.reshape(-1, 3, 32, 32), labels)
    _pickle(
        root / "batches.meta",
        {
            b"label_names": [n.encode() for n in DIGIT_NAMES],
            b"num_cases_per_batch": per_batch,
            b"num_vis": 3072,
        },
    )
    return written


def write_cifar100(root: str | Path, n: int) -> dict:
    """train, test (fine and coarse labels) and meta with 100 fine label names; random pixels."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fine_names = [f"fine_{i:02d}" for i in range(100)]
    written: dict = {"classes": fine_names}
    for seed, name in enumerate(["train", "test"]):
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n)
        _pickle(
            root / name,
            {
                b"filenames": [f"{name}_{j}.png".encode() for j in range(n)],
                b"batch_label": name.encode(),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": (fine // 5).tolist(),
                b"data": data,
            },
        )
        written[name] = (data.reshape(-1, 3, 32, 32), fine)
    _pickle(
        root / "meta",
        {
            b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
        },
    )
    return written


def write_svhn(root: str | Path, n: int) -> dict:
    """train_32x32.mat and test_32x32.mat: X uint8 [32, 32, 3, n], y [n, 1] with 10 for digit 0."""
    from scipy.io import savemat

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written: dict = {}
    for seed, name in enumerate(["train", "test"]):
        images, labels = digits(32)
        rng = np.random.default_rng(100 + seed)
        pick = rng.choice(len(labels), size=n, replace=n > len(labels))
        images, labels = images[pick], labels[pick]
        savemat(
            root / f"{name}_32x32.mat",
            {
                "X": images.transpose(1, 2, 3, 0),
                "y": np.where(labels == 0, 10, labels).astype(np.uint8)[:, None],
            },
        )
        written[name] = (images.transpose(0, 3, 1, 2), labels)
    return written
