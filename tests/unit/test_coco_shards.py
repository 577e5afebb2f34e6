"""A COCO set packed into shards without Ray (data/shards.py, `data pack --dataset coco`): each
image with its boxes, the manifest's counts and hashes, COCOeval's ground truth of the packed
val images, items equal to the files reader's, and each bad input as one message. Packing on
Ray into moto's S3 and a detector trained from the shards: tests/integration/test_shards.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.unit.test_detection import as_spec, detect_job
from wrn_cluster import data
from wrn_cluster.data import DataError, coco, shards
from wrn_cluster.data.synthetic import SHAPES, write_coco
from wrn_cluster.spec import SpecError

PER_SHARD = 8


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """40 shapes (about one training image in ten without boxes), one training image with
    boxes made undecodable, packed 8 images a shard."""
    root = tmp_path_factory.mktemp("coco")
    write_coco(str(root / "src"), images=40, size=64, seed=1)
    spec = as_spec(detect_job(root / "src"))
    files_train, files_val, _, _ = coco.build(spec)
    victim_index = next(i for i in range(len(files_train)) if files_train.split.offsets[i + 1])
    victim = root / "src" / "train2017" / files_train.split.file_names[victim_index].decode()
    victim.write_bytes(b"\xff\xd8\xff this is not a JPEG")
    manifest = shards.pack_here(str(root / "src"), str(root / "dst"), PER_SHARD, "coco")
    return root, spec, manifest, victim, victim_index


def reader(dst: Path, cache: Path):
    return shards.build_detection(
        str(dst),
        flip=True,
        seed=3,
        per_worker_batch=4,
        cache=str(cache),
        cache_limit=None,
        canonical_nodes=1,
    )


def test_the_manifest_counts_the_images_and_boxes_and_hashes_every_shard(packed):
    root, spec, manifest, victim, _ = packed
    train_doc = json.loads((root / "src" / spec.data.train_annotations).read_text())
    val_doc = json.loads((root / "src" / spec.data.val_annotations).read_text())
    files_train, files_val, categories, _ = coco.build(spec)
    assert manifest["kind"] == "coco" and manifest["classes"] == [name for _, name in SHAPES]
    assert manifest["coco"]["categories"] == categories.as_list()
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    # Training images without boxes are left out, as torchvision's recipe does; the broken one
    # is left out and named.
    assert train["samples"] == len(files_train) - 1 < len(train_doc["images"]) - 1
    assert (train["left_out"], train["left_out_examples"]) == (1, [victim.name])
    assert (val["samples"], val["left_out"]) == (len(val_doc["images"]), 0)
    left_out = manifest["coco"]["targets_left_out"]
    assert left_out["train"] == files_train.split.counts
    assert left_out["train"]["images_without_boxes"] > 0
    assert manifest["coco"]["empty_images"] == "left out"
    for shard in train["shards"] + val["shards"]:
        content = (root / "dst" / shard["name"]).read_bytes()
        assert (len(content), hashlib.sha256(content).hexdigest()) == (
            shard["bytes"],
            shard["sha256"],
        )
    # COCOeval's ground truth: the val file as checked (COCO's defaults filled in).
    ground_truth = json.loads((root / "dst" / shards.VAL_ANNOTATIONS).read_text())
    assert ground_truth == coco.read(str(root / "src"), spec.data.val_annotations).doc


def test_the_stream_gives_each_image_and_its_boxes_as_the_files_reader_does(packed, tmp_path):
    root, spec, manifest, _, victim_index = packed
    files_train, files_val, categories, _ = coco.build(spec)
    train, val, found_categories, truth = reader(root / "dst", tmp_path / "cache")
    assert found_categories == categories
    assert truth == coco.read(str(root / "src"), spec.data.val_annotations).doc
    assert train.counts == {**files_train.split.counts, "images": len(files_train) - 1}

    def same(item, expected):
        assert torch.equal(item[0], expected[0])
        for key in ("boxes", "labels"):
            assert torch.equal(item[1][key], expected[1][key]), key
        assert (item[1]["image_id"], item[1]["skipped"]) == (expected[1]["image_id"], False)

    assert len(val) == len(files_val)
    for i in range(len(val)):
        same(val[i], files_val[i])
    # Training, epoch 2: each image's flip is the files reader's for its index.
    files_train.set_epoch(2)
    train.start_epoch(2, 0)
    indices, flipped = [], 0
    for record in train.stream:
        index = int(record["index"])
        item = train.transform(record, 2)
        same(item, files_train[index])
        start, end = files_train.split.offsets[index], files_train.split.offsets[index + 1]
        flipped += not torch.equal(
            item[1]["boxes"], torch.from_numpy(files_train.split.boxes[start:end])
        )
        indices.append(index)
    assert sorted(indices) == [i for i in range(len(files_train)) if i != victim_index]
    assert 0 < flipped < len(indices)


def shards_spec(dst: Path, **data_fields):
    return as_spec(detect_job(dst, data={"format": "shards", **data_fields}))


def test_a_spec_must_keep_empty_images_as_the_shards_were_packed(packed):
    root = packed[0]
    assert (
        data.prepare(shards_spec(root / "dst")).train_images
        == (packed[2]["splits"]["train"]["samples"])
    )
    with pytest.raises(DataError) as caught:
        data.prepare(shards_spec(root / "dst", keep_empty_images=True))
    assert (
        "the shards were packed without --keep-empty-images, but data.keep_empty_images is "
        "true; set it to false, or pack the COCO set again with --keep-empty-images into "
        "another folder"
    ) in str(caught.value)


def test_packing_with_empty_images_keeps_every_training_image(packed, tmp_path):
    root, spec = packed[0], packed[1]
    manifest = shards.pack_here(
        str(root / "src"), str(tmp_path / "dst"), 64, "coco", keep_empty_images=True
    )
    train_doc = json.loads((root / "src" / spec.data.train_annotations).read_text())
    assert manifest["splits"]["train"]["samples"] == len(train_doc["images"]) - 1  # the victim
    assert manifest["coco"]["empty_images"] == "kept"
    data.prepare(shards_spec(tmp_path / "dst", keep_empty_images=True))


def test_classification_shards_are_refused_for_a_detection_job(tmp_path):
    from tests.datasets import write_cifar10

    write_cifar10(tmp_path / "src", 4)
    shards.pack_here(str(tmp_path / "src"), str(tmp_path / "dst"), 50, "cifar10")
    with pytest.raises(DataError) as caught:
        data.prepare(shards_spec(tmp_path / "dst"))
    assert str(caught.value) == (
        f"{tmp_path / 'dst'}: the shards hold a cifar10 dataset, not COCO; pack the COCO set "
        "with `wrn-cluster data pack SRC DST --dataset coco`"
    )


def test_a_missing_or_broken_val_annotation_file_is_refused_before_training(packed, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(packed[0] / "dst", copy)
    val = copy / shards.VAL_ANNOTATIONS
    val.write_text("{not json")
    with pytest.raises(DataError, match=r"annotations/val.json: not JSON \(.*\); pack the dataset"):
        data.prepare(shards_spec(copy))
    val.unlink()
    with pytest.raises(DataError) as caught:
        data.prepare(shards_spec(copy))
    assert str(caught.value).startswith(
        f"{copy}/annotations/val.json: the val annotations are missing; pack the dataset again"
    )


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        (
            {"train_annotations": "a.json"},
            "data.train_annotations",
            "packed shards carry their images and annotations",
        ),
        (
            {"group_aspect_ratio": True},
            "data.group_aspect_ratio",
            "shards are read in Streaming's order",
        ),
        ({"synthesize": {"images": 10}}, "data.synthesize", "synthetic data is written as files"),
    ],
)
def test_a_shards_spec_with_a_files_only_field_names_it(tmp_path, fields, field, message):
    with pytest.raises(SpecError) as caught:
        shards_spec(tmp_path, **fields)
    assert field in str(caught.value) and message in str(caught.value)


def test_keep_empty_images_is_for_coco_only(tmp_path):
    from tests.datasets import write_cifar10
    from wrn_cluster.pack import pack

    write_cifar10(tmp_path / "src", 4)
    with pytest.raises(DataError, match="--keep-empty-images is for --dataset coco"):
        pack(
            str(tmp_path / "src"),
            str(tmp_path / "dst"),
            images_per_shard=8,
            address=None,
            say=print,
            kind="cifar10",
            keep_empty_images=True,
        )


def test_a_skipped_shards_coco_sample_is_a_skipped_image_without_boxes():
    from wrn_cluster.data.shard_fetch import _unreadable

    record = {name: _unreadable(name, kind) for name, kind in shards.COCO_COLUMNS.items()}
    image, target = shards.DetectionRecord("s3://d", flip=True, seed=3)(record, 1)
    assert target["skipped"] and image.dtype == torch.uint8 and image.shape[0] == 3
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_packing_a_folder_without_cocos_layout_names_what_is_missing(tmp_path):
    write_coco(str(tmp_path / "src"), images=6, size=48, seed=1)
    (tmp_path / "src" / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(DataError) as caught:
        shards.pack_here(str(tmp_path / "src"), str(tmp_path / "dst"), 8, "coco")
    assert str(caught.value) == (
        f"{tmp_path / 'src'}/annotations/instances_val2017.json: not there; `data pack --dataset "
        "coco` reads COCO 2017's layout (annotations/instances_train2017.json, "
        "annotations/instances_val2017.json, train2017, val2017): point SRC at the folder that "
        "holds it"
    )
    assert not (tmp_path / "dst").exists()  # nothing written
