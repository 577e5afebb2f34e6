"""COCO-format detection data from any fsspec URL: annotation JSON checked field by field,
images read lazily, targets for torchvision's detection models, and COCO's own scoring.

The checks run on the driver in ``prepare`` (before any worker starts) and again where a worker
loads the same file, so a malformed file fails with the JSON path of its first problem, e.g.
``.../instances_train2017.json: annotations[3].bbox: ...``. As in COCO and torchvision's
reference: crowd regions are no training targets (COCOeval ignores detections on them),
boxes without width or height are dropped and counted, and category ids map to contiguous labels
1..K (0 is the background) in id order, and back for scoring.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import io
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision.transforms.v2 import functional as F

from wrn_cluster.data.base import DataError, Prepared
from wrn_cluster.data.storage import PerProcessFilesystem, filesystem, join
from wrn_cluster.data.synthetic import write_coco
from wrn_cluster.data.transforms import SharedEpoch, decode, item_generator

if TYPE_CHECKING:
    import fsspec

    from wrn_cluster.spec import DetectJob

log = logging.getLogger(__name__)

# How far a box may reach past the image before it is an error, not rounding; it is clipped.
BOX_SLACK_PX = 2.0
# The COCOeval summary, in its order, under the names users know.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _json_error(source: str, where: str, message: str) -> DataError:
    return DataError(f"{source}: {where}: {message}" if where else f"{source}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) and math.isfinite(value)


@dataclass
class Annotations:
    """A checked COCO annotation file. ``doc`` is the file itself, with COCOeval's defaults
    (iscrowd 0, area from the box) filled in; ``degenerate`` counts boxes without area."""

    source: str
    doc: dict[str, Any]
    degenerate: int = 0

    @property
    def categories(self) -> list[dict[str, Any]]:
        return self.doc["categories"]


def check(doc: Any, source: str) -> Annotations:
    """Check a loaded COCO annotation file; raise DataError naming the first problem's path."""
    if not isinstance(doc, dict):
        raise _json_error(
            source, "", "not a JSON object; a COCO file holds {images, annotations, categories}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise _json_error(source, key, "missing or not a list; COCO files have all three")
    if not doc["categories"]:
        raise _json_error(source, "categories", "empty; list the classes as {id, name}")

    category_ids: set[int] = set()
    for i, category in enumerate(doc["categories"]):
        where = f"categories[{i}]"
        if not isinstance(category, dict) or not _is_int(category.get("id")):
            raise _json_error(source, f"{where}.id", "missing or not an integer")
        if not isinstance(category.get("name"), str):
            raise _json_error(source, f"{where}.name", "missing or not a string")
        if category["id"] in category_ids:
            raise _json_error(source, f"{where}.id", f"{category['id']} appears twice")
        category_ids.add(category["id"])

    sizes: dict[int, tuple[int, int]] = {}
    for i, image in enumerate(doc["images"]):
        where = f"images[{i}]"
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            raise _json_error(source, f"{where}.id", "missing or not an integer")
        if image["id"] in sizes:
            raise _json_error(source, f"{where}.id", f"image id {image['id']} appears twice")
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise _json_error(source, f"{where}.file_name", "missing or not a file name")
        if _climbs_out(image["file_name"]):
            raise _json_error(
                source,
                f"{where}.file_name",
                f"{image['file_name']!r} is not a path inside the images folder; write it "
                "relative to data.train_images / data.val_images, without '..'",
            )
        for key in ("width", "height"):
            if not _is_int(image.get(key)) or image[key] <= 0:
                raise _json_error(source, f"{where}.{key}", "missing or not a positive integer")
        sizes[image["id"]] = (image["width"], image["height"])

    annotation_ids: set[int] = set()
    degenerate = 0
    for i, annotation in enumerate(doc["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(annotation, dict) or not _is_int(annotation.get("id")):
            raise _json_error(source, f"{where}.id", "missing or not an integer")
        if annotation["id"] in annotation_ids:
            raise _json_error(source, f"{where}.id", f"{annotation['id']} appears twice")
        annotation_ids.add(annotation["id"])
        image_id = annotation.get("image_id")
        if not _is_int(image_id) or image_id not in sizes:
            raise _json_error(
                source, f"{where}.image_id", f"{image_id!r} is not the id of any image in images"
            )
        category_id = annotation.get("category_id")
        if not _is_int(category_id) or category_id not in category_ids:
            raise _json_error(
                source,
                f"{where}.category_id",
                f"{category_id!r} is not in categories (ids {sorted(category_ids)[:20]}); "
                "add the category or fix the id",
            )
        box = annotation.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise _json_error(source, f"{where}.bbox", f"{box!r} is not [x, y, width, height]")
        x, y, w, h = box
        if w < 0 or h < 0:
            raise _json_error(
                source, f"{where}.bbox", f"{box} has a negative size; COCO boxes are [x, y, w, h]"
            )
        width, height = sizes[image_id]
        slack = BOX_SLACK_PX
        if x < -slack or y < -slack or x + w > width + slack or y + h > height + slack:
            raise _json_error(
                source,
                f"{where}.bbox",
                f"{box} reaches outside image {image_id} ({width}x{height}); COCO boxes are "
                "[x, y, width, height] in pixels of that image",
            )
        crowd = annotation.setdefault("iscrowd", 0)
        if crowd not in (0, 1):  # True/False pass too: they equal 1/0
            raise _json_error(source, f"{where}.iscrowd", f"{crowd!r} is not 0 or 1")
        area = annotation.setdefault("area", float(w * h))
        if not _is_number(area) or area < 0:
            raise _json_error(source, f"{where}.area", f"{area!r} is not a non-negative number")
        if _clipped(box, width, height) is None:
            degenerate += 1
    return Annotations(source, doc, degenerate)


def _climbs_out(path: str) -> bool:
    """A file name that is absolute or has '.'/'..' segments could read outside its folder."""
    parts = path.replace("\\", "/").split("/")
    return path.startswith(("/", "\\")) or "://" in path or any(p in (".", "..") for p in parts)


def _clipped(box: list[float], width: int, height: int) -> tuple[float, ...] | None:
    """[x, y, w, h] as (x1, y1, x2, y2) inside the image; None if nothing of it is left."""
    x1, y1 = max(0.0, box[0]), max(0.0, box[1])
    x2, y2 = min(float(width), box[0] + box[2]), min(float(height), box[1] + box[3])
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def read(url: str, path: str) -> Annotations:
    """Load and check ``url/path``; DataError if it is missing, not JSON or malformed."""
    fs, root = filesystem(url)
    full = join(root, path)
    source = f"{url.rstrip('/')}/{path}"
    if not fs.isfile(full):
        raise DataError(
            f"{source}: no such annotation file; check data.url and the data.*_annotations paths"
        )
    try:
        with fs.open(full, "rb") as handle:
            doc = json.load(handle)
    except (ValueError, RecursionError) as error:  # bad JSON or text, or nested too deep
        reason = str(error) if not isinstance(error, RecursionError) else "nested too deeply"
        raise DataError(f"{source}: not valid JSON ({reason})") from None
    return check(doc, source)


@dataclass(frozen=True)
class Categories:
    """COCO category ids in id order; label ``i + 1`` is ``ids[i]`` (0 is the background)."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def of(cls, annotations: Annotations) -> Categories:
        ordered = sorted(annotations.categories, key=lambda c: c["id"])
        return cls(tuple(c["id"] for c in ordered), tuple(c["name"] for c in ordered))

    @property
    def num_classes(self) -> int:
        """Detector outputs, background included."""
        return len(self.ids) + 1

    def label(self, category_id: int) -> int:
        return self.ids.index(category_id) + 1

    def category_ids(self) -> np.ndarray:
        """label -> category id, with -1 for the background label 0."""
        return np.array([-1, *self.ids], dtype=np.int64)

    def as_list(self) -> list[dict[str, Any]]:
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names, strict=True)]


@dataclass
class SplitIndex:
    """One split's images and training targets as flat arrays (no per-image Python objects, so
    forked DataLoader workers share them without copy-on-write growth)."""

    file_names: np.ndarray  # fixed-width bytes
    image_ids: np.ndarray  # int64 [N]
    sizes: np.ndarray  # int64 [N, 2]: height, width
    offsets: np.ndarray  # int64 [N + 1]: image i's boxes are boxes[offsets[i]:offsets[i + 1]]
    boxes: np.ndarray  # float32 [M, 4]: x1, y1, x2, y2 in pixels
    labels: np.ndarray  # int64 [M]: 1..K
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    def wide(self) -> np.ndarray:
        """1 where an image is at least as wide as tall: its aspect-ratio group."""
        return (self.sizes[:, 1] >= self.sizes[:, 0]).astype(np.int64)


def index(annotations: Annotations, categories: Categories, keep_empty: bool) -> SplitIndex:
    """Training targets per image: no crowd regions, no degenerate boxes; images left without
    boxes are kept only when ``keep_empty``. ``counts`` says what was left out and why."""
    by_image: dict[int, list[dict]] = {}
    for annotation in annotations.doc["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    label_of = {cid: i + 1 for i, cid in enumerate(categories.ids)}
    names, ids, sizes, offsets, boxes, labels = [], [], [], [0], [], []
    counts = {"crowd": 0, "degenerate_boxes": 0, "images_without_boxes": 0}
    for image in annotations.doc["images"]:
        width, height = image["width"], image["height"]
        kept = []
        for annotation in by_image.get(image["id"], []):
            if annotation["iscrowd"]:
                counts["crowd"] += 1
                continue
            box = _clipped(annotation["bbox"], width, height)
            if box is None:
                counts["degenerate_boxes"] += 1
                continue
            kept.append((box, label_of[annotation["category_id"]]))
        if not kept:
            counts["images_without_boxes"] += 1
            if not keep_empty:
                continue
        names.append(image["file_name"])
        ids.append(image["id"])
        sizes.append((height, width))
        boxes += [box for box, _ in kept]
        labels += [label for _, label in kept]
        offsets.append(offsets[-1] + len(kept))
    counts["images"] = len(ids)
    counts["boxes"] = len(labels)
    return SplitIndex(
        file_names=np.array(names, dtype=np.bytes_),
        image_ids=np.array(ids, dtype=np.int64),
        sizes=np.array(sizes, dtype=np.int64).reshape(-1, 2),
        offsets=np.array(offsets, dtype=np.int64),
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
        counts=counts,
    )


def check_images(url: str, images_path: str, annotations: Annotations) -> None:
    """Every file the JSON names is in the images folder (one listing, no reads)."""
    fs, root = filesystem(url)
    folder = join(root, images_path)
    where = f"{url.rstrip('/')}/{images_path}"
    if not fs.isdir(folder):
        raise DataError(
            f"{where}: no such images folder (named by {annotations.source}); check data.url "
            "and the data.*_images paths"
        )
    prefix = folder.rstrip("/") + "/"
    present = {p[len(prefix) :] for p in fs.find(folder, withdirs=False) if p.startswith(prefix)}
    images = annotations.doc["images"]
    missing = [i for i, image in enumerate(images) if image["file_name"] not in present]
    if missing:
        first = missing[0]
        raise _json_error(
            annotations.source,
            f"images[{first}].file_name",
            f"{images[first]['file_name']!r} is not in {where} ({len(missing)} of "
            f"{len(images)} images missing); copy the images there or fix data.*_images",
        )


def same_categories(train: Annotations, val: Annotations) -> None:
    if Categories.of(train) != Categories.of(val):
        raise DataError(
            f"{val.source}: categories differ from {train.source}'s; both splits need the same "
            "category ids and names"
        )


def only_images(doc: dict[str, Any], left_out: set[str]) -> dict[str, Any]:
    """``doc`` without the images named in ``left_out`` (by file name) and their annotations:
    the ground truth of a split whose unreadable images were not packed."""
    if not left_out:
        return doc
    images = [image for image in doc["images"] if image["file_name"] not in left_out]
    kept = {image["id"] for image in images}
    annotations = [a for a in doc["annotations"] if a["image_id"] in kept]
    return {**doc, "images": images, "annotations": annotations}


def prepare(spec: DetectJob, write: bool = True) -> Prepared:
    """Write synthetic shapes if asked and absent, then check both splits: annotation files,
    categories, and that every image they name exists. With ``write=False`` (a dry run) a
    dataset that would be synthesized is not written, and not counted."""
    data = spec.data
    if data.synthesize is not None and _is_missing(data.url, data.train_annotations):
        if not write:
            return Prepared(None, synthetic=True)
        synth = data.synthesize
        layout = (data.train_annotations, data.val_annotations, data.train_images, data.val_images)
        write_coco(data.url, synth.images, synth.size, synth.val_fraction, spec.seed, layout)
        written = True
    else:
        written = False
    train = read(data.url, data.train_annotations)
    val = read(data.url, data.val_annotations)
    same_categories(train, val)
    check_images(data.url, data.train_images, train)
    check_images(data.url, data.val_images, val)
    counts = index(train, Categories.of(train), data.keep_empty_images).counts
    return Prepared(counts["images"], synthetic=written)


def _is_missing(url: str, annotations_path: str) -> bool:
    fs, root = filesystem(url)
    return not fs.exists(join(root, annotations_path))


class CocoDetection(Dataset):
    """(uint8 [3, H, W], target) items at the image's own size; the detector resizes.

    target: ``boxes`` float32 [n, 4] (x1, y1, x2, y2 pixels), ``labels`` int64 [n] in 1..K,
    ``image_id``, and ``skipped``: an unreadable image comes back black with no boxes (a
    background-only image, harmless to train on) and is counted by the loop.
    """

    def __init__(self, url: str, images_path: str, split: SplitIndex, flip: bool, seed: int):
        self.url = url
        self.images_path = images_path
        self.split = split
        self.flip = flip
        self.seed = seed
        self.shared_epoch = SharedEpoch()
        self.files = PerProcessFilesystem(url)
        self.root = join(filesystem(url)[1], images_path)

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.set(epoch)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self.files.get()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        split = self.split
        start, end = split.offsets[index], split.offsets[index + 1]
        height, width = (int(v) for v in split.sizes[index])
        path = join(self.root, split.file_names[index].decode())
        try:
            data = self.fs.cat_file(path)
        except Exception as error:  # one bad file must not stop a long run; the loop counts it
            log.warning("skipping unreadable image %s: %s", path, error)
            data = None
        generator = item_generator(self.seed, int(self.shared_epoch), index) if self.flip else None
        return item(
            data,
            (height, width),
            torch.from_numpy(split.boxes[start:end].copy()),
            torch.from_numpy(split.labels[start:end].copy()),
            int(split.image_ids[index]),
            path,
            generator,
        )


def item(
    data: bytes | None,
    size: tuple[int, int],
    boxes: torch.Tensor,
    labels: torch.Tensor,
    image_id: int,
    where: str,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """An image's (uint8 [3, H, W], target) from its file's bytes ``data``, its (height, width)
    as the annotations give it and its targets, flipped with its boxes if ``generator`` draws
    so (None: never). An image that cannot be read (``data`` None), decoded, or is not that
    size comes back black without boxes and ``skipped``: the step trains it as a background-only
    image and the loop counts it; evaluation leaves it out."""
    height, width = size
    skipped = False
    try:
        if data is None:
            raise ValueError("it could not be read")
        image = decode(data)
        if tuple(image.shape[-2:]) != (height, width):
            raise ValueError(
                f"it is {image.shape[-1]}x{image.shape[-2]}, the JSON says {width}x{height}"
            )
    except Exception as error:  # one bad image must not stop a long run; the loop counts it
        if data is not None:
            log.warning("skipping undecodable image %s: %s", where, error)
        image = torch.zeros(3, max(height, 1), max(width, 1), dtype=torch.uint8)
        boxes, labels, skipped = boxes[:0], labels[:0], True
    if generator is not None and torch.rand((), generator=generator).item() < 0.5:
        image = F.horizontal_flip(image)
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    return image, {"boxes": boxes, "labels": labels, "image_id": image_id, "skipped": skipped}


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images keep their own sizes: torchvision's detectors batch (and pad) them themselves."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of one aspect-ratio group (wide or tall images), in the order of a distributed
    sampler's share; what is left over at the end is batched mixed. Every rank gets exactly
    ceil(share / batch_size) batches, so DDP ranks never wait on one another."""

    def __init__(self, sampler: DistributedSampler, groups: np.ndarray, batch_size: int) -> None:
        self.sampler = sampler
        self.groups = groups
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        for i in self.sampler:
            bucket = buckets.setdefault(int(self.groups[i]), [])
            bucket.append(i)
            if len(bucket) == self.batch_size:
                yield bucket
                buckets[int(self.groups[i])] = []
        rest = [i for group in sorted(buckets) for i in buckets[group]]
        for start in range(0, len(rest), self.batch_size):
            yield rest[start : start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


def build(
    spec: DetectJob,
) -> tuple[CocoDetection, CocoDetection, Categories, dict[str, Any]]:
    """(train set, val set, categories, the val annotation file for COCOeval)."""
    data = spec.data
    train = read(data.url, data.train_annotations)
    val = read(data.url, data.val_annotations)
    same_categories(train, val)
    categories = Categories.of(train)
    train_index = index(train, categories, data.keep_empty_images)
    val_index = index(val, categories, keep_empty=True)  # COCO scores every val image
    return (
        CocoDetection(data.url, data.train_images, train_index, data.flip, spec.seed),
        CocoDetection(data.url, data.val_images, val_index, False, spec.seed),
        categories,
        val.doc,
    )


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """pycocotools prints every stage; the loop reports the numbers itself. Ray Train routes
    print() to its logger (past redirect_stdout), so print itself is pointed at a sink."""
    saved = builtins.print
    builtins.print = functools.partial(saved, file=io.StringIO())
    try:
        yield
    finally:
        builtins.print = saved


def score(ground_truth: dict[str, Any], detections: np.ndarray) -> dict[str, float]:
    """COCOeval's bbox AP, AP50, AP75, APs, APm, APl of ``detections``: rows of
    (image_id, x, y, width, height, score, category_id) over the images of ``ground_truth``.

    -1 is COCO's value for an area range without ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) == 0:  # loadRes refuses an empty list; nothing found scores 0
        return dict.fromkeys(METRICS, 0.0)
    with _silenced():
        truth = COCO()
        truth.dataset = ground_truth
        truth.createIndex()
        found = truth.loadRes(np.asarray(detections, dtype=np.float64))
        evaluation = COCOeval(truth, found, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(value) for name, value in zip(METRICS, evaluation.stats, strict=False)}
