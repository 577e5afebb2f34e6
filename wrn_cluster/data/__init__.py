"""Datasets: imagefolder (local or S3), CIFAR-10/100, SVHN and synthetic ones for classification;
COCO-format detection data (``coco``).

``prepare(spec)`` runs on the driver before any worker starts: it writes synthetic data when asked
and checks the dataset by listing it, so a wrong URL fails in seconds, not inside every worker.
``build_datasets(spec)`` runs in each training worker and returns uint8 images; the training loop
normalizes them on the device with ``spec.data.mean_std()``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from wrn_cluster.data import cifar, coco, imagefolder, shards, synthetic
from wrn_cluster.data.base import DataError, Prepared
from wrn_cluster.data.storage import access_errors
from wrn_cluster.data.transforms import Policy
from wrn_cluster.spec.datasets import DATASET_FACTS

__all__ = ["DataError", "Prepared", "build_datasets", "build_detection_datasets", "prepare"]

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from wrn_cluster.spec import ClassifyJob, DetectJob


def eval_resize(spec: ClassifyJob) -> int:
    """Shorter side before the evaluation centre crop: data.eval_resize, else eval_size / 0.875
    (torchvision's V2 recipe: a 224 crop of a 232 resize, so it sets data.eval_resize)."""
    return spec.data.eval_resize or round(spec.eval_size / 0.875)


def policy(spec: ClassifyJob) -> Policy | None:
    """The recipe's augmentation of each training view (data.augmentation), None if none."""
    aug = spec.data.augmentation
    mean = spec.data.mean_std()[0]
    erase_value = (round(255 * mean[0]), round(255 * mean[1]), round(255 * mean[2]))
    return Policy(aug.policy, aug.random_erasing, erase_value) or None


@contextmanager
def _reading(url: str) -> Iterator[None]:
    """Turn "cannot reach the store" into a DataError naming the URL and what to check."""

    try:
        yield
    except access_errors() as error:
        raise DataError(
            f"{url}: cannot access the dataset ({type(error).__name__}: {error}); check data.url "
            "and, for s3://, the endpoint and credentials in the environment "
            "(AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        ) from None


def prepare(spec: ClassifyJob | DetectJob, write: bool = True) -> Prepared:
    """Write synthetic data if asked and absent, then check the dataset; raise DataError if bad.

    With ``write=False`` (a dry run) nothing is written; a dataset that would be synthesized is
    then counted from data.synthesize instead of being listed.
    """
    data = spec.data
    with _reading(data.url):
        if data.format == "shards":
            if data.dataset == "coco":  # COCO shards first: their message says what to pack
                shards.val_annotations(data.url, shards.read_manifest(data.url))
            num_classes = None if data.dataset == "coco" else spec.model.num_classes
            manifest = shards.check(data.url, num_classes, data.shard_cache_limit, data.dataset)
            if data.dataset == "coco":
                _same_empty_images(spec, manifest)
            return Prepared(manifest["splits"]["train"]["samples"], synthetic=False)
        if data.dataset == "coco":
            return coco.prepare(spec, write)
        if data.dataset == "imagefolder":
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

        cifar.check(data.dataset, data.url)
        return Prepared(DATASET_FACTS[data.dataset].train_images, synthetic=False)


def _same_empty_images(spec: DetectJob, manifest: dict[str, Any]) -> None:
    """A packed COCO set holds training images without boxes only if packed with
    --keep-empty-images; the spec's data.keep_empty_images must say the same."""
    packed = shards.detection_facts(manifest, spec.data.url)["empty_images"] == "kept"
    if packed != spec.data.keep_empty_images:
        how = "with" if packed else "without"
        raise DataError(
            f"{spec.data.url}: the shards were packed {how} --keep-empty-images, but "
            f"data.keep_empty_images is {str(spec.data.keep_empty_images).lower()}; set it to "
            f"{str(packed).lower()}, or pack the COCO set again "
            f"{'without' if packed else 'with'} --keep-empty-images into another folder"
        )


def build_detection_datasets(
    spec: DetectJob, attempt: str = "0", world: int | None = None
) -> tuple[Dataset, Dataset, Any, dict]:
    """(train, val, categories, the val annotation file): see ``coco.build``, or for packed
    shards ``shards.build_detection`` (a stream, cached in ``shard_cache(spec, attempt)``)."""
    data = spec.data
    with _reading(data.url):
        if data.format == "shards":
            return shards.build_detection(
                data.url,
                flip=data.flip,
                seed=spec.seed,
                per_worker_batch=spec.worker_batch(world or spec.scaling.max_workers),
                cache=shard_cache(spec, attempt),
                cache_limit=data.shard_cache_limit,
                canonical_nodes=data.canonical_nodes,
                adopt=True,
            )
        return coco.build(spec)


def num_classes(spec: ClassifyJob) -> int:
    """Classes the dataset holds: fixed for CIFAR/SVHN, the class folders for imagefolder."""
    fixed = DATASET_FACTS[spec.data.dataset].num_classes
    if fixed:
        return fixed
    if spec.data.format == "shards":
        return len(shards.read_manifest(spec.data.url)["classes"])

    return len(imagefolder.scan(spec.data.url)[0])


def shard_cache(spec: ClassifyJob | DetectJob, attempt: str) -> str:
    """This node's cache folder for the job's shards, one per attempt of the job (Streaming
    refuses a folder that another, perhaps killed, reader registered); ``shards.build`` moves
    the earlier attempts' whole shards into it."""
    root = spec.data.shard_cache or os.path.join(tempfile.gettempdir(), "wrn-cluster-shards")
    return os.path.join(root, spec.name, attempt)


def build_datasets(
    spec: ClassifyJob, attempt: str = "0", world: int | None = None
) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class names); items are (uint8 [3, S, S], label), label -1 for a bad image.

    Train datasets have ``set_epoch(epoch)``: augmentation depends on (spec.seed, epoch, index)
    only, so it is the same for any number of DataLoader workers or DDP ranks; with
    data.augmentation.repeats they also serve each item's copies (``transforms.source_index``).
    Validation images are centre crops of ``spec.eval_size``, never augmented. Packed shards
    (``data.format: shards``) give a stream instead (``shards.ShardStream``), cached in
    ``shard_cache(spec, attempt)``.
    """
    data = spec.data
    with _reading(data.url):
        if data.format == "shards":
            return shards.build(
                data.url,
                size=spec.image_size,
                eval_resize=eval_resize(spec),
                augment=spec.augment,
                seed=spec.seed,
                eval_size=spec.eval_size,
                policy=policy(spec),
                per_worker_batch=spec.worker_batch(world or spec.scaling.max_workers),
                cache=shard_cache(spec, attempt),
                cache_limit=data.shard_cache_limit,
                canonical_nodes=data.canonical_nodes,
                adopt=True,
            )
        repeats = data.augmentation.repeats
        if data.dataset == "imagefolder":
            return imagefolder.build(
                data.url,
                spec.image_size,
                eval_resize(spec),
                spec.augment,
                spec.seed,
                eval_size=spec.eval_size,
                policy=policy(spec),
                repeats=repeats,
            )
        # CIFAR and SVHN are evaluated on their 32x32 images as they are.
        return cifar.build(
            data.dataset, data.url, spec.augment, spec.seed, policy=policy(spec), repeats=repeats
        )
