"""Datasets: imagefolder (local or S3), CIFAR-10/100, SVHN and synthetic ones for classification;
COCO-format detection data (``coco``).

``prepare(spec)`` runs on the driver before any worker starts: it writes synthetic data when asked
and checks the dataset by listing it, so a wrong URL fails in seconds, not inside every worker.
``build_datasets(spec)`` runs in each training worker and returns uint8 images; the training loop
normalizes them on the device with ``spec.data.mean_std()``.

Importing this package is cheap (no torch); the loaders are imported when first used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from wrn_cluster.spec import ClassifyJob, DetectJob


class DataError(Exception):
    """A dataset problem the user can fix; the message names the URL and the fix."""


def eval_resize(spec: ClassifyJob) -> int:
    """Shorter side before the evaluation centre crop: data.eval_resize, else size / 0.875."""
    return spec.data.eval_resize or round(spec.image_size / 0.875)


@contextmanager
def _reading(url: str) -> Iterator[None]:
    """Turn "cannot reach the store" into a DataError naming the URL and what to check."""
    from wrn_cluster.data.storage import access_errors

    try:
        yield
    except access_errors() as error:
        raise DataError(
            f"{url}: cannot access the dataset ({type(error).__name__}: {error}); check data.url "
            "and, for s3://, the endpoint and credentials in the environment "
            "(AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        ) from None


class Prepared(NamedTuple):
    """What prepare() found: training images (None where counting them is not cheap), and
    whether synthetic data was written (in a dry run: would be)."""

    train_images: int | None
    synthetic: bool


def prepare(spec: ClassifyJob | DetectJob, write: bool = True) -> Prepared:
    """Write synthetic data if asked and absent, then check the dataset; raise DataError if bad.

    With ``write=False`` (a dry run) nothing is written; a dataset that would be synthesized is
    then counted from data.synthesize instead of being listed.
    """
    data = spec.data
    with _reading(data.url):
        if data.dataset == "coco":
            from wrn_cluster.data import coco

            return coco.prepare(spec, write)
        if data.dataset == "imagefolder":
            from wrn_cluster.data import imagefolder, synthetic

            synth = data.synthesize
            if synth is not None and imagefolder.is_missing_or_empty(data.url):
                if not write:
                    per_class = synthetic.train_per_class(synth.per_class, synth.val_fraction)
                    return Prepared(synth.classes * per_class, synthetic=True)
                synthetic.write_imagefolder(
                    data.url,
                    synth.classes,
                    synth.per_class,
                    synth.size,
                    synth.val_fraction,
                    spec.seed,
                )
                return Prepared(len(imagefolder.scan(data.url)[1]), synthetic=True)
            return Prepared(len(imagefolder.scan(data.url)[1]), synthetic=False)
        from wrn_cluster.data import cifar

        cifar.check(data.dataset, data.url)
        return Prepared(cifar.TRAIN_IMAGES.get(data.dataset), synthetic=False)


def build_detection_datasets(spec: DetectJob) -> tuple[Dataset, Dataset, Any, dict]:
    """(train, val, categories, the val annotation file): see ``coco.build``."""
    with _reading(spec.data.url):
        from wrn_cluster.data import coco

        return coco.build(spec)


def num_classes(spec: ClassifyJob) -> int:
    """Classes the dataset holds: fixed for CIFAR/SVHN, the class folders for imagefolder."""
    from wrn_cluster.spec import DATASET_FACTS

    fixed = DATASET_FACTS[spec.data.dataset].get("num_classes")
    if fixed:
        return fixed
    from wrn_cluster.data import imagefolder

    return len(imagefolder.scan(spec.data.url)[0])


def build_datasets(spec: ClassifyJob) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class names); items are (uint8 [3, S, S], label), label -1 for a bad image.

    Train datasets have ``set_epoch(epoch)``: augmentation depends on (spec.seed, epoch, index)
    only, so it is the same for any number of DataLoader workers or DDP ranks.
    """
    data = spec.data
    with _reading(data.url):
        if data.dataset == "imagefolder":
            from wrn_cluster.data import imagefolder

            return imagefolder.build(
                data.url, spec.image_size, eval_resize(spec), spec.augment, spec.seed
            )
        from wrn_cluster.data import cifar

        return cifar.build(data.dataset, data.url, spec.augment, spec.seed)
