"""Datasets packed into shards, streamed from object storage by MosaicML Streaming.

A packed dataset (``wrn-cluster data pack``) is a folder on any fsspec URL::

    manifest.json               format and version, source and its kind, classes, how images
                                are stored, per split: samples, images left out, and every
                                shard's name, samples, size and SHA-256
    train/index.json            Streaming's MDS index of the split's shards
    train/shard.00000.mds ...   one MDS shard per part: each image as its source holds it (an
                                ImageFolder's file bytes; CIFAR's and SVHN's uint8 pixels), its
                                label and its index in the split
    train/parts/00000.json      a finished part's record (written after its shard: the marker)
    val/...                     the same for val

Packing works in parts of ``images_per_shard`` images, each part one shard, so a part is the
unit of parallel work and of a rerun: a part whose record and shard are there is skipped.

Reading: Streaming's StreamingDataset streams whole shards into a bounded node-local cache and
shuffles them in blocks. Its order of an epoch is a function of the shuffle seed, the epoch and
``num_canonical_nodes`` only, not of the number of ranks or loader processes, and it resumes
mid-epoch from a sample count: the same property the map-style readers have (train/order.py),
so the loop's step checkpoints hold for shards unchanged. Each record carries the sample's
index in its split, so augmentation draws from ``item_generator(seed, epoch, index)`` as for
files. Validation reads every sample exactly once: rank r takes samples r, r + world, ...
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from wrn_cluster.data import cifar, coco, imagefolder, shard_fetch
from wrn_cluster.data.base import DataError
from wrn_cluster.data.storage import filesystem, join
from wrn_cluster.data.transforms import (
    PadCropFlip,
    Policy,
    RandomResizedCropFlip,
    SharedEpoch,
    item_generator,
    training_image,
)
from wrn_cluster.spec.datasets import COCO_LAYOUT, DATASET_FACTS

log = logging.getLogger(__name__)

FORMAT = "wrn-cluster-shards"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
KINDS = (*DATASET_FACTS, "coco")  # what `data pack` reads: every dataset a spec names
FILE_BYTES = {"encoding": "file"}  # an image record is its source file's bytes
COLUMNS = {"image": "bytes", "label": "int", "index": "int"}
# A COCO image's record: its file's bytes, its place in the split, its COCO id and size, and
# its training targets (boxes float32 [n, 4] x1, y1, x2, y2 in pixels; labels int64 [n] in
# 1..K) as raw little-endian arrays.
COCO_COLUMNS = {
    "image": "bytes",
    "index": "int",
    "image_id": "int",
    "height": "int",
    "width": "int",
    "boxes": "bytes",
    "labels": "bytes",
}
VAL_ANNOTATIONS = "annotations/val.json"  # COCO's ground truth of the packed val images
MDS_LIMIT = (1 << 32) - 1
READ_AHEAD = 64  # source files read at once by a packing task
ATTEMPT = re.compile(r"[0-9a-f]{12}")  # an attempt's cache folder (train.order.attempt_token)
PACK_AGAIN = (
    "pack the dataset again with `wrn-cluster data pack SRC DST` (finished shards are kept)"
)


def shard_name(part: int) -> str:
    return f"shard.{part:05d}.mds"


def part_record_path(root: str, split: str, part: int) -> str:
    return join(root, split, "parts", f"{part:05d}.json")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Packing: parts of a split, each one shard


# A COCO image's training targets: (image id, height, width, boxes as [x1, y1, x2, y2, ...],
# labels 1..K)
Target = tuple[int, int, int, tuple[float, ...], tuple[int, ...]]


@dataclass(frozen=True)
class Part:
    """``images`` with their ``labels`` and their indices in the split, packed into shard number
    ``number`` of ``split``. An ImageFolder's images are paths relative to the split folder;
    those of an in-memory release (CIFAR, SVHN) are their indices, with ``pixels`` the SHA-256
    of their pixels."""

    split: str
    number: int
    images: list[str]
    labels: list[int]
    first_index: int
    pixels: str = ""
    folder: str = ""  # the images' folder in the source, if not the split's name (COCO's)
    targets: tuple[Target, ...] = ()  # COCO: each image's id, size and boxes

    def digest(self) -> str:
        """What the part holds (its images, labels and place in the split), to tell whether a
        finished part of an earlier pack is this one: the source or --images-per-shard may
        have changed since."""
        text = json.dumps(
            [self.split, self.first_index, self.images, self.labels, self.pixels]
            + ([self.folder, [list(t) for t in self.targets]] if self.targets else [])
        )
        return _sha256(text.encode())

    def record(self, offset: int, data: bytes) -> dict[str, Any]:
        """The shard record of the part's image ``offset`` with its bytes ``data``."""
        index = self.first_index + offset
        if not self.targets:
            return {"image": data, "label": self.labels[offset], "index": index}
        image_id, height, width, boxes, labels = self.targets[offset]
        return {
            "image": data,
            "index": index,
            "image_id": image_id,
            "height": height,
            "width": width,
            "boxes": np.asarray(boxes, dtype="<f4").reshape(-1, 4).tobytes(),
            "labels": np.asarray(labels, dtype="<i8").tobytes(),
        }


@dataclass
class CocoSource:
    """What a COCO pack keeps besides the images: the categories, what was left out of the
    training targets and why (``coco.index``'s counts), whether training images without boxes
    were kept, and the val split's annotation file (COCOeval's ground truth)."""

    categories: list[dict[str, Any]]
    counts: dict[str, dict[str, int]]
    keep_empty_images: bool
    val_doc: dict[str, Any]


@dataclass
class Source:
    """What `data pack` reads: the dataset's kind, classes and each split's parts; for CIFAR
    and SVHN also each split's images, uint8 [N, 3, 32, 32], which go to the parts' tasks."""

    kind: str
    classes: list[str]
    parts: dict[str, list[Part]]
    arrays: dict[str, np.ndarray] | None = None
    coco: CocoSource | None = None

    def columns(self) -> dict[str, str]:
        return COCO_COLUMNS if self.coco else COLUMNS

    def image_format(self) -> dict[str, Any]:
        if self.arrays is None:
            return FILE_BYTES
        return {"encoding": "raw", "dtype": "uint8", "shape": list(self.arrays["train"].shape[1:])}

    def pixels_of(self, part: Part) -> np.ndarray | None:
        return None if self.arrays is None else self.arrays[part.split]


def plan_parts(
    split: str,
    names: list[str],
    labels: list[int],
    images_per_shard: int,
    images: np.ndarray | None = None,
) -> list[Part]:
    parts = []
    for n, start in enumerate(range(0, len(names), images_per_shard)):
        end = start + images_per_shard
        pixels = "" if images is None else _sha256(images[start:end].tobytes())
        parts.append(Part(split, n, names[start:end], labels[start:end], start, pixels))
    return parts


def plan(
    src: str, images_per_shard: int, kind: str = "imagefolder", keep_empty_images: bool = False
) -> Source:
    """Every split's parts of the ``kind`` dataset at ``src`` (an ImageFolder is listed once, a
    CIFAR or SVHN release read into memory, a COCO set's annotation files read and checked)."""
    if kind == "coco":
        return plan_coco(src, images_per_shard, keep_empty_images)
    if kind == "imagefolder":
        classes, train, val = imagefolder.scan(src)
        parts = {
            split: plan_parts(
                split,
                [os.fsdecode(path) for path in index.paths],
                index.labels.tolist(),
                images_per_shard,
            )
            for split, index in (("train", train), ("val", val))
        }
        return Source(kind, classes, parts)
    (train_images, train_labels), (val_images, val_labels), classes = cifar.load(kind, src)
    arrays = {"train": train_images, "val": val_images}
    labels = {"train": train_labels, "val": val_labels}
    parts = {
        split: plan_parts(
            split,
            [str(i) for i in range(len(arrays[split]))],
            labels[split].tolist(),
            images_per_shard,
            arrays[split],
        )
        for split in SPLITS
    }
    return Source(kind, classes, parts, arrays)


def plan_coco(src: str, images_per_shard: int, keep_empty_images: bool) -> Source:
    """The parts of a COCO set in COCO 2017's layout at ``src`` (``spec.COCO_LAYOUT``): each
    image with the training targets ``coco.index`` gives it (no crowd regions, no degenerate
    boxes). Training images left without boxes are packed only with ``keep_empty_images``, as
    torchvision's recipe drops them; val keeps every image, as COCOeval scores them all."""
    train_json, val_json, train_images, val_images = COCO_LAYOUT
    fs, root = filesystem(src)
    missing = [path for path in COCO_LAYOUT if not fs.exists(join(root, path))]
    if missing:
        raise DataError(
            f"{src.rstrip('/')}/{missing[0]}: not there; `data pack --dataset coco` reads COCO "
            f"2017's layout ({', '.join(COCO_LAYOUT)}): point SRC at the folder that holds it"
        )
    train_doc, val_doc = coco.read(src, train_json), coco.read(src, val_json)
    coco.same_categories(train_doc, val_doc)
    coco.check_images(src, train_images, train_doc)
    coco.check_images(src, val_images, val_doc)
    categories = coco.Categories.of(train_doc)
    parts, counts = {}, {}
    for split, doc, folder, keep in (
        ("train", train_doc, train_images, keep_empty_images),
        ("val", val_doc, val_images, True),
    ):
        index = coco.index(doc, categories, keep)
        counts[split] = index.counts
        names = [name.decode() for name in index.file_names.tolist()]
        targets = [
            (
                int(index.image_ids[i]),
                int(index.sizes[i, 0]),
                int(index.sizes[i, 1]),
                tuple(index.boxes[index.offsets[i] : index.offsets[i + 1]].ravel().tolist()),
                tuple(index.labels[index.offsets[i] : index.offsets[i + 1]].tolist()),
            )
            for i in range(len(index))
        ]
        parts[split] = [
            Part(
                split,
                n,
                names[start : start + images_per_shard],
                [0] * len(names[start : start + images_per_shard]),
                start,
                folder=folder,
                targets=tuple(targets[start : start + images_per_shard]),
            )
            for n, start in enumerate(range(0, len(names), images_per_shard))
        ]
    found = CocoSource(categories.as_list(), counts, keep_empty_images, val_doc.doc)
    return Source("coco", list(categories.names), parts, coco=found)


def pack_here(
    src: str,
    dst: str,
    images_per_shard: int,
    kind: str = "imagefolder",
    keep_empty_images: bool = False,
) -> dict:
    """`wrn-cluster data pack` without Ray: the unfinished parts one after the other, here."""
    source = plan(src, images_per_shard, kind, keep_empty_images)
    for split_parts in source.parts.values():
        for part in split_parts:
            if not part_is_done(dst, part):
                pack_part(src, dst, part, source.pixels_of(part))
    return finish(src, dst, source, images_per_shard)


def part_is_done(dst: str, part: Part) -> bool:
    """Whether a previous pack finished ``part``: its record is there and so is its shard, with
    the size the record gives (a deleted or cut-short shard is packed again)."""
    fs, root = filesystem(dst)
    record_path = part_record_path(root, part.split, part.number)
    try:
        record = json.loads(fs.cat_file(record_path))
        if record.get("plan") != part.digest():
            return False  # another plan's part: the source or --images-per-shard changed
        if record["shard"] is None:  # none of its images decoded: there is no shard to check
            return record["samples"] == 0
        shard = fs.info(join(root, part.split, record["shard"]["name"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False
    return int(shard["size"]) == int(record["shard"]["bytes"])


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # PIL raises many kinds for a broken file
        return False
    return True


def _image_files(src: str, part: Part) -> Iterator[tuple[int, bytes | None]]:
    """(offset in the part, the file's bytes, or None if it cannot be read or decoded) of each
    image of an ImageFolder part, in order."""
    src_fs, src_root = filesystem(src)
    split_root = join(src_root, part.folder or part.split)
    for start in range(0, len(part.images), READ_AHEAD):
        # Many GETs in flight at once (s3fs runs a list's requests concurrently): on object
        # storage a part waits for the store's latency once per READ_AHEAD files.
        paths = [join(split_root, p) for p in part.images[start : start + READ_AHEAD]]
        found = src_fs.cat(paths, on_error="return")
        for offset, path in enumerate(paths, start):
            data = found.get(path)  # bytes, or the error reading it
            yield offset, data if isinstance(data, bytes) and _decodes(data) else None


def pack_part(src: str, dst: str, part: Part, pixels: np.ndarray | None = None) -> dict:
    """Read the part's images from ``src`` (an ImageFolder URL; or, for CIFAR and SVHN, take
    them from ``pixels``, its split's images), leave out those that do not decode, write them
    as one MDS shard (each image's bytes as the source holds them) and upload it to ``dst``,
    then the part's record; returns the record."""
    from streaming import MDSWriter

    dst_fs, dst_root = filesystem(dst)
    if pixels is None:
        images = _image_files(src, part)
    else:
        first = part.first_index
        images = enumerate(image.tobytes() for image in pixels[first : first + len(part.images)])
    left_out: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        # One shard per part, up to MDS's limit (its offsets are 32-bit).
        with MDSWriter(
            out=scratch,
            columns=COCO_COLUMNS if part.targets else COLUMNS,
            size_limit=MDS_LIMIT,
            hashes=["sha256"],
        ) as writer:
            written = 0
            for offset, data in images:
                if data is None:
                    left_out.append(part.images[offset])
                    continue
                writer.write(part.record(offset, data))
                written += 1
        index = json.loads(Path(scratch, "index.json").read_text())
        name = shard_name(part.number)
        if len(index["shards"]) > 1:
            raise DataError(
                f"{src}: {len(part.images)} images make a shard over MDS's 4 GiB; pack with "
                "fewer --images-per-shard"
            )
        if written:
            [entry] = index["shards"]
            with open(os.path.join(scratch, entry["raw_data"]["basename"]), "rb") as stream:
                shard = stream.read()
            entry["raw_data"]["basename"] = name
        else:  # every image of the part was unreadable: no shard, only the record
            entry, shard = None, b""
    if entry is not None:
        dst_fs.makedirs(join(dst_root, part.split), exist_ok=True)
        dst_fs.pipe_file(join(dst_root, part.split, name), shard)
    record = {
        "part": part.number,
        "split": part.split,
        "plan": part.digest(),
        "samples": written,
        "left_out": left_out,
        "shard": {"name": name, "bytes": len(shard), "sha256": _sha256(shard)} if entry else None,
        "mds": entry,
    }
    record_path = part_record_path(dst_root, part.split, part.number)
    dst_fs.makedirs(join(dst_root, part.split, "parts"), exist_ok=True)
    dst_fs.pipe_file(record_path, json.dumps(record).encode())  # last: the part is finished
    return record


def finish(src: str, dst: str, source: Source, images_per_shard: int) -> dict[str, Any]:
    """Write each split's MDS index from its parts' records, then the manifest (last: a packed
    dataset without one is unfinished); returns the manifest."""
    fs, root = filesystem(dst)
    splits: dict[str, Any] = {}
    for split, split_parts in source.parts.items():
        records = [
            json.loads(fs.cat_file(part_record_path(root, split, part.number)))
            for part in split_parts
        ]
        with_shard = [r for r in records if r["shard"]]
        index = {"version": 2, "shards": [r["mds"] for r in with_shard]}
        fs.pipe_file(join(root, split, "index.json"), json.dumps(index).encode())
        splits[split] = {
            "samples": sum(r["samples"] for r in records),
            "left_out": sum(len(r["left_out"]) for r in records),
            "left_out_examples": [p for r in records for p in r["left_out"]][:20],
            "shards": [
                {
                    "name": f"{split}/{r['shard']['name']}",
                    "samples": r["samples"],
                    **{k: r["shard"][k] for k in ("bytes", "sha256")},
                }
                for r in with_shard
            ],
        }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "source": src,
        "kind": source.kind,
        "image": source.image_format(),
        "classes": source.classes,
        "images_per_shard": images_per_shard,
        "splits": splits,
    }
    if source.coco is not None:
        left_out = set(splits["val"]["left_out_examples"])
        if splits["val"]["left_out"] > len(left_out):  # the examples are cut at 20: all of them
            left_out = {
                name
                for part in source.parts["val"]
                for name in json.loads(fs.cat_file(part_record_path(root, "val", part.number)))[
                    "left_out"
                ]
            }
        val_doc = coco.only_images(source.coco.val_doc, left_out)
        fs.makedirs(join(root, "annotations"), exist_ok=True)
        fs.pipe_file(join(root, VAL_ANNOTATIONS), json.dumps(val_doc).encode())
        manifest["coco"] = {
            "categories": source.coco.categories,
            "targets_left_out": source.coco.counts,
            "empty_images": "kept" if source.coco.keep_empty_images else "left out",
            "val_annotations": VAL_ANNOTATIONS,
        }
    fs.pipe_file(join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


# ---------------------------------------------------------------------------------------------
# Checking a packed dataset (the driver, before any worker starts)


def read_manifest(url: str) -> dict[str, Any]:
    """The manifest of the packed dataset at ``url``; DataError if it is missing or is not one
    this version reads."""
    fs, root = filesystem(url)
    path = join(root, MANIFEST)
    try:
        manifest = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise DataError(
            f"{url}: no {MANIFEST}; data.format shards reads a dataset packed by `wrn-cluster "
            "data pack` (an unfinished pack writes its manifest last: run it again)"
        ) from None
    except ValueError as error:
        raise DataError(f"{url}/{MANIFEST} is not JSON ({error}); {PACK_AGAIN}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{url}/{MANIFEST} is not a wrn-cluster shards manifest; {PACK_AGAIN}")
    if manifest.get("version") != VERSION:
        raise DataError(
            f"{url}/{MANIFEST} has format version {manifest.get('version')}, this wrn-cluster "
            f"reads version {VERSION}; {PACK_AGAIN} with this version"
        )
    return manifest


SIZE_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}  # Streaming's


def size_in_bytes(size: str) -> int:
    """'200gb' -> bytes, in Streaming's units (1 kb = 1024 b); the spec checks the form."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?b)", size.strip().lower())
    if not found:
        raise ValueError(f"{size!r} is not a size; write it like 500mb, 200gb or 2tb")
    return int(float(found.group(1)) * SIZE_UNITS[found.group(2)])


def check(
    url: str,
    num_classes: int | None = None,
    cache_limit: str | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Read the manifest and list every shard: a missing shard, or one whose size differs from
    the manifest (cut short or replaced), is a DataError naming it, as is a ``cache_limit``
    (data.shard_cache_limit) under the four shards Streaming keeps. SHA-256 is checked as each
    shard is streamed (Streaming's ``validate_hash``). With ``num_classes`` (model.num_classes),
    the packed classes must match it; with ``dataset`` (data.dataset), the packed kind."""
    manifest = read_manifest(url)
    if dataset is not None and manifest["kind"] != dataset:
        raise DataError(
            f"{url}: the shards were packed from a {manifest['kind']} dataset, but data.dataset "
            f"is {dataset}; set data.dataset: {manifest['kind']}, or pack the {dataset} data "
            f"with `wrn-cluster data pack SRC DST --dataset {dataset}`"
        )
    classes = manifest["classes"]
    if num_classes is not None and num_classes != len(classes):
        raise DataError(
            f"{url}: the shards hold {len(classes)} classes, but model.num_classes is "
            f"{num_classes}; leave model.num_classes out (it follows the data) or pack the "
            "dataset the model was made for"
        )
    largest = max(
        (shard["bytes"] for split in manifest["splits"].values() for shard in split["shards"]),
        default=0,
    )
    if cache_limit is not None and size_in_bytes(cache_limit) < 4 * largest:
        raise DataError(
            f"{url}: data.shard_cache_limit {cache_limit} holds fewer than four of its largest "
            f"shards ({largest / 1e6:.2f} MB each), which Streaming needs; raise it to at least "
            f"{-(-4 * largest // SIZE_UNITS['mb'])}mb"
        )
    fs, root = filesystem(url)
    for split in SPLITS:
        listed = (
            {
                entry["name"].rsplit("/", 1)[-1]: int(entry["size"])
                for entry in fs.ls(join(root, split), detail=True)
                if entry["type"] == "file"
            }
            if fs.isdir(join(root, split))
            else {}
        )
        for shard in manifest["splits"][split]["shards"]:
            base = shard["name"].rsplit("/", 1)[-1]
            if base not in listed:
                raise DataError(f"{url}/{shard['name']}: the shard is missing; {PACK_AGAIN}")
            if listed[base] != shard["bytes"]:
                raise DataError(
                    f"{url}/{shard['name']}: {listed[base]} bytes, the manifest says "
                    f"{shard['bytes']}; the shard is truncated or was replaced; {PACK_AGAIN}"
                )
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading, in each training worker


@contextmanager
def damaged_shards_named(url: str) -> Iterator[None]:
    """Streaming's "Checksum failure: <cache path>" as one DataError naming the shard, and a
    DataError of its download thread (``shard_fetch``'s), which Streaming wraps in a
    RuntimeError, as itself."""
    try:
        yield
    except DataError:
        raise
    except (ValueError, RuntimeError) as error:
        wrapped = re.search(r"background thread failed: DataError: (.*)", str(error), re.DOTALL)
        if wrapped:
            raise DataError(wrapped.group(1)) from None
        found = re.search(r"Checksum failure: (\S+)", str(error))
        if not found:
            raise
        split, name = Path(found.group(1)).parent.name, Path(found.group(1)).name
        raise DataError(
            f"{url}/{split}/{name}: the shard does not match its SHA-256 in the manifest; it is "
            f"damaged; {PACK_AGAIN}"
        ) from None


def check_layout(url: str, world: int, local_world: int, canonical_nodes: int) -> None:
    """Streaming splits an epoch over nodes of equally many ranks, and needs canonical and
    physical nodes to divide one another; anything else is one DataError with the fix."""
    nodes, rest = divmod(world, local_world)
    if rest:
        raise DataError(
            f"{url}: shards are streamed by nodes with equally many workers, but {world} workers "
            f"do not split into nodes of {local_world}; set scaling.workers to a multiple of the "
            "workers per node (scaling.placement_strategy SPREAD or STRICT_PACK helps)"
        )
    if canonical_nodes % nodes and nodes % canonical_nodes:
        raise DataError(
            f"{url}: data.canonical_nodes {canonical_nodes} and the {nodes} nodes the workers "
            "run on must divide one another; change scaling.workers, or data.canonical_nodes "
            "for a new job (it fixes the sample order, so keep it for a resumed one)"
        )


def _stream(
    url: str,
    split: str,
    cache: str,
    shuffle: bool,
    seed: int,
    batch: int,
    read_ahead: int = 0,
    **options,
):
    """Streaming's StreamingDataset over one split, caching shards in ``cache``; a shard whose
    download keeps failing is retried with backoff, then read as unreadable samples, and with
    ``read_ahead`` that many shards are fetched ahead (``shard_fetch``)."""
    from streaming import StreamingDataset

    if url.startswith("file://") or "://" not in url:  # Streaming reads local paths, not file://
        remote = os.path.join(filesystem(url)[1], split)
    else:
        remote = join(url.rstrip("/"), split)
    return StreamingDataset(
        streams=[shard_fetch.RetryingStream(remote=remote, local=cache, read_ahead=read_ahead)],
        shuffle=shuffle,
        shuffle_seed=seed,
        batch_size=batch,
        validate_hash="sha256",
        **options,
    )


class ShardTransform:
    """Decode and (for training) augment a record as the files reader of its kind does its
    images: an ImageFolder's file bytes as ``imagefolder``, CIFAR's and SVHN's pixels as
    ``cifar`` (the paper's pad-crop-flip), each from the generator of (seed, epoch, index), then
    a recipe's ``policy`` from the same generator."""

    def __init__(
        self,
        url: str,
        size: int,
        eval_resize: int,
        augment: bool,
        seed: int,
        image_format: dict[str, Any] = FILE_BYTES,
        policy: Policy | None = None,
    ) -> None:
        self.url = url
        self.size = size
        self.eval_resize = eval_resize
        self.seed = seed
        self.policy = policy or None
        self.shape = tuple(image_format["shape"]) if image_format["encoding"] == "raw" else None
        self.augment: Any = None
        if augment:
            self.augment = PadCropFlip(4) if self.shape else RandomResizedCropFlip(size)

    def __call__(self, record: dict[str, Any], epoch: int) -> tuple[torch.Tensor, int]:
        index = int(record["index"])
        if not record["image"]:  # a skipped shard's sample (shard_fetch): counted, not decoded
            return torch.zeros(self.shape or (3, self.size, self.size), dtype=torch.uint8), -1
        if self.shape is not None:  # uint8 pixels, as CIFAR and SVHN hold them
            image = torch.frombuffer(bytearray(record["image"]), dtype=torch.uint8)
            image = image.reshape(self.shape)
            if self.augment is not None or self.policy is not None:
                generator = item_generator(self.seed, epoch, index)
                if self.augment is not None:
                    image = self.augment(image, generator)
                if self.policy is not None:
                    image = self.policy(image, generator)
            return image, int(record["label"])
        item = (self.seed, epoch, index)
        image = training_image(
            record["image"], self.augment, item, self.eval_resize, self.size, self.policy
        )
        if image is None:
            log.warning("skipping undecodable sample %d of %s", index, self.url)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1
        return image, int(record["label"])


class ShardStream(IterableDataset):
    """The training split as a stream of (uint8 [3, S, S], label): the epoch's order, and the
    position a resumed run starts from, are Streaming's (see ``start_epoch``)."""

    def __init__(
        self,
        url: str,
        stream: Any,
        transform: Callable[[dict[str, Any], int], tuple[torch.Tensor, Any]],
        canonical_nodes: int,
    ) -> None:
        self.url = url
        self.stream = stream
        self.transform = transform
        self.canonical_nodes = canonical_nodes
        self.shared_epoch = SharedEpoch()
        self.counts: dict[str, int] = {}  # what the pack left out of the split, if it says

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.set(epoch)

    def start_epoch(self, epoch: int, samples_done: int) -> None:
        """The next pass is ``epoch`` (0-based), after its first ``samples_done`` samples over
        every rank. Streaming keeps this in shared memory, so persistent loader processes see it.
        Shards that a reader replaced by unreadable samples (``shard_fetch``) are evicted first,
        so this epoch downloads them again."""
        self.set_epoch(epoch)
        self.evict_skipped()
        self.stream.load_state_dict(
            {
                "epoch": epoch,
                "sample_in_epoch": samples_done,
                "num_canonical_nodes": self.canonical_nodes,
                "shuffle_seed": self.transform.seed,
            }
        )

    def evict_skipped(self) -> None:
        """Evict each shard whose substitute left its marker; the rank that removes a marker
        evicts (Streaming's eviction is safe across the node's processes)."""
        numbers = {shard.file_pairs[0][0].basename: n for n, shard in enumerate(self.stream.shards)}
        for stream in self.stream.streams:
            folder = os.path.join(stream.local, stream.split or "")
            for marker in Path(folder).glob(f"*{shard_fetch.SKIPPED}"):
                try:
                    marker.unlink()
                except FileNotFoundError:
                    continue  # another rank of the node took it
                number = numbers.get(marker.name.removesuffix(shard_fetch.SKIPPED))
                if number is not None:
                    self.stream.evict_shard(number)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        epoch = int(self.shared_epoch)
        with damaged_shards_named(self.url):
            for record in self.stream:
                yield self.transform(record, epoch)

    def __len__(self) -> int:
        return len(self.stream)  # this rank's samples of a whole epoch, before padding

    def batches_per_epoch(self, rank: int, local_world: int, world: int, workers: int) -> int:
        """The batches a DataLoader with ``workers`` processes gets from this rank's part of an
        epoch. Streaming pads the epoch over its canonical nodes, so this can exceed
        ``len(self) / batch``; it is what the loop must count (last step, schedule length)."""
        from streaming.base.partition import get_partitions

        check_layout(self.url, world, local_world, self.canonical_nodes)
        batch = self.stream.batch_size
        ids = get_partitions(
            self.stream.partition_algo,
            self.stream.epoch_size,
            self.canonical_nodes,
            world // local_world,
            local_world,
            max(1, workers),
            batch,
        )
        mine = ids[rank // local_world, rank % local_world]  # (workers, batches, batch)
        return sum(-(-int((worker >= 0).sum()) // batch) for worker in mine)


class ShardSplit(Dataset):
    """A split read by index (validation): item i is the split's sample i, whole shards cached."""

    def __init__(
        self, url: str, stream: Any, transform: Callable[[dict[str, Any], int], tuple]
    ) -> None:
        self.url = url
        self.stream = stream
        self.transform = transform

    def __len__(self) -> int:
        return self.stream.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with damaged_shards_named(self.url):
            return self.transform(self.stream.get_item(index), 0)


def _splits(
    url: str,
    manifest: dict[str, Any],
    cache: str,
    cache_limit: str | None,
    canonical_nodes: int,
    seed: int,
    per_worker_batch: int,
    adopt: bool,
) -> tuple[Any, Any]:
    """Streaming's datasets of the train split (shuffled by ``seed`` over ``canonical_nodes``,
    at most ``cache_limit`` cached) and the val split, in ``cache``; with ``adopt``, the whole
    shards of the job's earlier attempts move in first (``adopt_earlier_attempts``)."""
    if adopt:
        adopt_earlier_attempts(cache, manifest)
    with one_registration_at_a_time():
        train = _stream(
            url,
            "train",
            os.path.join(cache, "train"),
            True,
            seed,
            per_worker_batch,
            read_ahead_here(manifest, "train", cache_limit),
            num_canonical_nodes=canonical_nodes,
            cache_limit=cache_limit,
        )
        val = _stream(
            url,
            "val",
            os.path.join(cache, "val"),
            False,
            seed,
            per_worker_batch,
            read_ahead_here(manifest, "val", None),
        )
    return train, val


def read_ahead_here(manifest: dict[str, Any], split: str, cache_limit: str | None) -> int:
    """How many shards to fetch ahead (``shard_fetch.READ_AHEAD``) where it pays: this node
    reads every shard of the split (one node) and none is evicted (no cache limit, or one that
    holds the whole split), so a shard fetched ahead is always used and always fits; else 0."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    nodes = world // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    split_bytes = sum(shard["bytes"] for shard in manifest["splits"][split]["shards"])
    fits = cache_limit is None or size_in_bytes(cache_limit) >= split_bytes
    return shard_fetch.READ_AHEAD if nodes <= 1 and fits else 0


class DetectionRecord:
    """A COCO record as the files reader's item (``coco.item``): (uint8 [3, H, W] at its own
    size, target), flipped with its boxes by the generator of (seed, epoch, index)."""

    def __init__(self, url: str, flip: bool, seed: int) -> None:
        self.url = url
        self.flip = flip
        self.seed = seed

    def __call__(self, record: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict]:
        index = int(record["index"])
        boxes = np.frombuffer(record["boxes"], dtype="<f4").reshape(-1, 4)
        labels = np.frombuffer(record["labels"], dtype="<i8")
        return coco.item(
            record["image"] or None,  # a skipped shard's records hold no bytes
            (int(record["height"]), int(record["width"])),
            torch.from_numpy(boxes.copy()),
            torch.from_numpy(labels.copy()),
            int(record["image_id"]),
            f"{self.url} sample {index}",
            item_generator(self.seed, epoch, index) if self.flip else None,
        )


def detection_facts(manifest: dict[str, Any], url: str) -> dict[str, Any]:
    """The ``coco`` part of a packed COCO set's manifest; DataError if it is not one."""
    if manifest.get("kind") != "coco" or "coco" not in manifest:
        raise DataError(
            f"{url}: the shards hold a {manifest.get('kind')} dataset, not COCO; pack the COCO "
            "set with `wrn-cluster data pack SRC DST --dataset coco`"
        )
    return manifest["coco"]


def val_annotations(url: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The val annotation file of the packed COCO set at ``url`` (COCOeval's ground truth);
    DataError if the shards are no COCO set's, or the file is missing or not JSON."""
    facts = detection_facts(manifest, url)
    fs, root = filesystem(url)
    where = f"{url.rstrip('/')}/{facts['val_annotations']}"
    try:
        doc = json.loads(fs.cat_file(join(root, facts["val_annotations"])))
    except FileNotFoundError:
        raise DataError(f"{where}: the val annotations are missing; {PACK_AGAIN}") from None
    except ValueError as error:
        raise DataError(f"{where}: not JSON ({error}); {PACK_AGAIN}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{where}: not a COCO annotation file; {PACK_AGAIN}")
    return doc


def build_detection(
    url: str,
    *,
    flip: bool,
    seed: int,
    per_worker_batch: int,
    cache: str,
    cache_limit: str | None,
    canonical_nodes: int,
    adopt: bool = False,
) -> tuple[ShardStream, ShardSplit, coco.Categories, dict[str, Any]]:
    """(train stream, val split, categories, the val annotation file for COCOeval) of the
    packed COCO set at ``url``, as ``build`` (its shards cached under ``cache``) and as
    ``coco.build`` gives them for files. The train stream's ``counts`` are the pack's counts
    of what the training targets left out (crowd regions, degenerate boxes, empty images)."""
    manifest = read_manifest(url)
    facts = detection_facts(manifest, url)
    train, val = _splits(
        url, manifest, cache, cache_limit, canonical_nodes, seed, per_worker_batch, adopt
    )
    val_doc = val_annotations(url, manifest)
    ordered = sorted(facts["categories"], key=lambda c: c["id"])
    categories = coco.Categories(tuple(c["id"] for c in ordered), tuple(c["name"] for c in ordered))
    stream = ShardStream(url, train, DetectionRecord(url, flip, seed), canonical_nodes)
    stream.counts = {
        **facts["targets_left_out"]["train"],
        "images": manifest["splits"]["train"]["samples"],
    }
    return stream, ShardSplit(url, val, DetectionRecord(url, False, seed)), categories, val_doc


def adopt_earlier_attempts(cache: str, manifest: dict[str, Any]) -> None:
    """Move the whole shards that this job's earlier attempts cached on this node into
    ``cache`` (a restarted worker group need not download them again), then delete their
    folders: one run of a job name at a time, so they are dead. A shard is adopted only with
    the size the manifest gives (a copy cut short by a kill is left to download again). The
    node's first rank does it, before any reader opens the cache."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    job_root, mine = os.path.split(cache)
    if not os.path.isdir(job_root):
        return
    sizes = {
        shard["name"]: shard["bytes"]
        for split in manifest["splits"].values()
        for shard in split["shards"]
    }
    for name in os.listdir(job_root):
        if name == mine or not ATTEMPT.fullmatch(name):
            continue
        earlier = Path(job_root, name)
        for shard in earlier.glob("*/*.mds"):
            relative = f"{shard.parent.name}/{shard.name}"
            if sizes.get(relative) == shard.stat().st_size:
                os.makedirs(os.path.join(cache, shard.parent.name), exist_ok=True)
                os.replace(shard, os.path.join(cache, relative))
        shutil.rmtree(earlier, ignore_errors=True)


REGISTRATION_LOCK = "wrn-cluster-streaming-registration.lock"
REGISTRATION_WAIT_S = 120.0


@contextmanager
def one_registration_at_a_time(wait_s: float = REGISTRATION_WAIT_S) -> Iterator[None]:
    """Streaming registers a dataset in the node's shared memory by finding the first free
    prefix and then creating it, so two jobs (or test processes) starting datasets on one node
    at once can pick the same prefix, and one of them fails with FileExistsError. Here the
    local leaders (local rank 0) of the jobs on a node take turns under one file lock; a job's
    other ranks register once their leader holds it (a barrier), while no other job can.

    After ``wait_s`` without the lock, a leader registers anyway with a warning, since two
    multi-node jobs whose leaders hold each other's nodes' locks would otherwise wait for ever."""
    import fcntl
    import time

    import torch.distributed as dist
    from streaming.base.distributed import get_local_rank, maybe_init_dist

    started = maybe_init_dist()  # as StreamingDataset does when torch.distributed is not up
    held = None
    try:
        if get_local_rank() == 0:
            lock = open(os.path.join(tempfile.gettempdir(), REGISTRATION_LOCK), "a")  # noqa: SIM115
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = lock
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        lock.close()
                        log.warning(
                            "another job has been registering shard streams on this node for "
                            "%.0f s; registering without waiting longer",
                            wait_s,
                        )
                        break
                    time.sleep(0.05)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        yield
    finally:
        if held is not None:
            held.close()  # releases the lock
        if started:
            dist.destroy_process_group()


def build(
    url: str,
    *,
    size: int,
    eval_resize: int,
    augment: bool,
    seed: int,
    per_worker_batch: int,
    cache: str,
    cache_limit: str | None,
    canonical_nodes: int,
    adopt: bool = False,
    eval_size: int | None = None,
    policy: Policy | None = None,
) -> tuple[ShardStream, ShardSplit, list[str]]:
    """(train stream, val split, class names) of the packed dataset at ``url``, with the
    shards cached under ``cache`` (this node's, one folder per split). With ``adopt``,
    ``cache`` is one attempt's folder of a job's (``data.shard_cache``), and the shards of its
    sibling folders, the job's earlier attempts, move in first. Training views are ``size``,
    then ``policy``; validation takes a centre ``eval_size`` (``size`` if None) after a resize to
    ``eval_resize``, as ``imagefolder.build`` (CIFAR's and SVHN's pixels stay as they are)."""
    manifest = read_manifest(url)
    train, val = _splits(
        url, manifest, cache, cache_limit, canonical_nodes, seed, per_worker_batch, adopt
    )
    image_format = manifest.get("image", FILE_BYTES)
    eval_size = eval_size or size
    train_resize = round(eval_resize * size / eval_size)  # as imagefolder.build
    return (
        ShardStream(
            url,
            train,
            ShardTransform(url, size, train_resize, augment, seed, image_format, policy),
            canonical_nodes,
        ),
        ShardSplit(
            url, val, ShardTransform(url, eval_size, eval_resize, False, seed, image_format)
        ),
        list(manifest["classes"]),
    )
