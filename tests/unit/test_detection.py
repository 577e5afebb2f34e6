"""COCO detection on a WRN backbone: the data (checks, targets, flips, batches), COCO scoring,
the detector and its spec. The short run on a real local Ray (learns, logs to MLflow, ships a
model, resumes) is in tests/integration/test_detection.py."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from wrn_cluster.data import DataError, coco, prepare
from wrn_cluster.data.synthetic import SHAPES, write_coco
from wrn_cluster.models import build_detector, build_model
from wrn_cluster.models import detection as detection_models
from wrn_cluster.spec import DetectJob, SpecError, parse
from wrn_cluster.train import checkpoint

ROOT = Path(__file__).resolve().parents[2]
TRAIN_JSON = "annotations/instances_train2017.json"
VAL_JSON = "annotations/instances_val2017.json"


def detect_job(url, storage="/unused", name="shapes", **sections) -> dict:
    """A CPU-sized detection job: a WRN-18-0.5 backbone, 96px shapes, small heads."""
    job = {
        "kind": "detect",
        "name": name,
        "seed": 3,
        "model": {"arch": "wrn-18-0.5"},
        "detector": {
            "fpn_channels": 64,
            "box_head_size": 256,
            # The shapes are 16-48px: torchvision's 32-512 anchors, one octave down.
            "anchor_sizes": [16, 32, 64, 128, 256],
            "rpn_train_proposals": 300,
            "rpn_test_proposals": 150,
            "box_samples_per_image": 64,
        },
        "data": {
            "url": str(url),
            "batch_size": 8,
            "min_size": 96,
            "max_size": 128,
            "loader_workers": 0,
        },
        "optimizer": {"lr": 0.02, "base_batch_size": 8},
        "schedule": {"epochs": 4, "milestones": [3], "warmup_steps": 20},
        "precision": {"dtype": "fp32", "channels_last": False},
        "scaling": {"workers": 2},
        "checkpoint": {"storage": str(storage)},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        job[section] = {**job.get(section, {}), **values} if isinstance(values, dict) else values
    return job


def as_spec(job: dict) -> DetectJob:
    return parse(yaml.safe_dump(job), "detect.yaml")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_coco(str(root), images=40, size=64, seed=1)
    return root


def coco_file(images: list[dict], annotations: list[dict], categories=None) -> dict:
    return {
        "images": images,
        "annotations": annotations,
        "categories": categories or [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}],
    }


def image(i: int, width: int = 40, height: int = 30) -> dict:
    return {"id": i, "file_name": f"{i}.jpg", "width": width, "height": height}


def box(i: int, image_id: int, bbox: list, category: int = 5, **extra) -> dict:
    return {"id": i, "image_id": image_id, "category_id": category, "bbox": bbox, **extra}


# ---------------------------------------------------------------------------------------------
# COCO scoring


def test_ground_truth_as_detections_scores_ap_1_and_shifted_boxes_less(shapes):
    truth = coco.read(str(shapes), VAL_JSON).doc
    rows = np.array(
        [[a["image_id"], *a["bbox"], 1.0, a["category_id"]] for a in truth["annotations"]]
    )
    perfect = coco.score(truth, rows)
    assert perfect["AP"] == perfect["AP50"] == perfect["AP75"] == 1.0
    shifted = rows.copy()
    shifted[:, 1] += 0.2 * rows[:, 3]  # a fifth of the box's width to the right: IoU 2/3
    moved = coco.score(truth, shifted)
    assert moved["AP50"] == 1.0 and moved["AP75"] == 0.0 and 0.2 < moved["AP"] < 0.6
    assert coco.score(truth, np.zeros((0, 7)))["AP"] == 0.0


def test_crowd_regions_count_as_ignored_not_as_misses():
    truth = coco.check(
        coco_file(
            [image(1)],
            [box(1, 1, [2, 2, 10, 10]), box(2, 1, [20, 5, 15, 20], iscrowd=1)],
        ),
        "mem.json",
    ).doc
    # The crowd detection scores highest: were it a false positive, AP would halve.
    found = coco.score(truth, np.array([[1, 2, 2, 10, 10, 0.9, 5], [1, 20, 5, 15, 20, 0.95, 5]]))
    assert found["AP"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Targets


def test_targets_leave_out_crowds_drop_degenerate_boxes_and_map_categories():
    annotations = coco.check(
        coco_file(
            [image(10), image(11), image(12)],
            [
                box(1, 10, [2, 3, 10, 12], category=9),
                box(2, 10, [0, 0, 40, 30], iscrowd=1),
                box(3, 10, [5, 5, 0, 8]),  # no width
                box(4, 11, [39.5, 10, 1.5, 4]),  # inside the slack, clipped to 0.5px wide
                box(5, 12, [7, 7, 3, 3], iscrowd=1),
            ],
        ),
        "mem.json",
    )
    assert annotations.degenerate == 1
    categories = coco.Categories.of(annotations)
    assert categories.ids == (5, 9) and categories.num_classes == 3
    assert categories.label(9) == 2 and categories.category_ids()[2] == 9
    split = coco.index(annotations, categories, keep_empty=False)
    assert split.counts == {
        "crowd": 2,
        "degenerate_boxes": 1,
        "images_without_boxes": 1,
        "images": 2,
        "boxes": 2,
    }
    assert split.image_ids.tolist() == [10, 11]  # 12 holds only a crowd region
    np.testing.assert_allclose(split.boxes, [[2, 3, 12, 15], [39.5, 10, 40, 14]])
    assert split.labels.tolist() == [2, 1]
    kept = coco.index(annotations, categories, keep_empty=True)
    assert kept.image_ids.tolist() == [10, 11, 12] and kept.offsets.tolist() == [0, 1, 2, 2]


def test_flip_moves_the_boxes_with_the_image_and_depends_on_seed_epoch_index(shapes):
    spec = as_spec(detect_job(shapes))
    train, _, _, _ = coco.build(spec)
    plain = copy.copy(train)
    plain.flip = False
    flipped_once = False
    for index in range(len(train)):
        picture, target = train[index]
        original, truth = plain[index]
        again, _ = train[index]
        assert torch.equal(picture, again)  # same (seed, epoch, index), same view
        if torch.equal(picture, original):
            assert torch.equal(target["boxes"], truth["boxes"])
            continue
        flipped_once = True
        width = original.shape[-1]
        assert torch.equal(picture, original.flip(-1))
        expected = truth["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
            [width, 0, width, 0]
        )
        assert torch.allclose(target["boxes"], expected)
        x1, x2 = int(target["boxes"][0, 0]) + 1, int(target["boxes"][0, 2]) - 1
        y = int(target["boxes"][0, 1] + target["boxes"][0, 3]) // 2
        # The shape's pixels sit inside its moved box: brighter than the dark background there.
        assert picture[:, y, x1:x2].float().max() > 150
    assert flipped_once
    views = []
    for epoch in (0, 1):
        train.set_epoch(epoch)
        views.append(torch.cat([train[i][0].flatten()[:64] for i in range(len(train))]))
    assert not torch.equal(*views)


def test_grouped_batches_keep_orientations_apart_and_give_every_rank_as_many(shapes):
    spec = as_spec(detect_job(shapes))
    train, _, _, _ = coco.build(spec)
    wide = train.split.wide()
    assert 0 < wide.sum() < len(wide)  # the synthetic set holds both orientations
    counts, seen = [], []
    for rank in range(3):
        sampler = torch.utils.data.DistributedSampler(train, 3, rank, shuffle=True, seed=0)
        batches = list(coco.GroupedBatchSampler(sampler, wide, 4))
        counts.append(len(batches))
        assert len(batches) == len(coco.GroupedBatchSampler(sampler, wide, 4))
        full = [b for b in batches if len({int(wide[i]) for i in b}) == 1]
        assert len(full) >= len(batches) - 2  # only the leftovers may mix
        seen += [i for b in batches for i in b]
    assert len(set(counts)) == 1
    assert set(seen) == set(range(len(train)))


def test_loader_batches_are_lists_of_images_at_their_own_sizes(shapes):
    spec = as_spec(detect_job(shapes))
    train, _, _, _ = coco.build(spec)
    images, targets = next(iter(DataLoader(train, batch_size=4, collate_fn=coco.collate)))
    assert len(images) == len(targets) == 4
    assert all(i.dtype == torch.uint8 and i.shape[0] == 3 for i in images)
    assert {tuple(i.shape[1:]) for i in images} <= {(64, 64), (48, 64), (64, 48)}
    assert all(t["labels"].min() >= 1 and t["boxes"].shape[1] == 4 for t in targets)


# ---------------------------------------------------------------------------------------------
# Bad input: one DataError, before training, naming the file and the JSON path


def broken(shapes: Path, tmp_path: Path, how: str) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(shapes, root)
    doc = json.loads((root / TRAIN_JSON).read_text())
    if how == "missing image":
        (root / "train2017" / doc["images"][3]["file_name"]).unlink()
    elif how == "box outside the image":
        doc["annotations"][2]["bbox"][0] = 500.0
    elif how == "unknown category":
        doc["annotations"][1]["category_id"] = 42
    elif how == "not a box":
        doc["annotations"][4]["bbox"] = [1, 2, 3]
    elif how == "image id twice":
        doc["images"][5]["id"] = doc["images"][4]["id"]
    (root / TRAIN_JSON).write_text(json.dumps(doc))
    return root


@pytest.mark.parametrize(
    ("how", "where", "says"),
    [
        ("missing image", "images[3].file_name", "is not in"),
        ("box outside the image", "annotations[2].bbox", "reaches outside image"),
        ("unknown category", "annotations[1].category_id", "42 is not in categories"),
        ("not a box", "annotations[4].bbox", "is not [x, y, width, height]"),
        ("image id twice", "images[5].id", "appears twice"),
    ],
)
def test_a_malformed_annotation_file_is_one_data_error_naming_the_json_path(
    shapes, tmp_path, how, where, says
):
    root = broken(shapes, tmp_path, how)
    with pytest.raises(DataError) as caught:
        prepare(as_spec(detect_job(root)))
    message = str(caught.value)
    assert message.startswith(f"{root}/{TRAIN_JSON}: {where}: "), message
    assert says in message


def test_submit_fails_on_bad_annotations_before_ray_starts(shapes, tmp_path):
    root = broken(shapes, tmp_path, "unknown category")
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(detect_job(root, tmp_path / "runs")))
    run = subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 1
    assert f"{TRAIN_JSON}: annotations[1].category_id: 42 is not in categories" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert "embedded local Ray" not in run.stdout


def test_synthetic_coco_is_the_same_for_the_same_seed_and_the_cli_writes_it(tmp_path):
    write_coco(str(tmp_path / "a"), images=12, size=48, seed=5)
    write_coco(str(tmp_path / "b"), images=12, size=48, seed=5)
    for path in (TRAIN_JSON, VAL_JSON, "train2017/000011.jpg"):
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    doc = json.loads((tmp_path / "a" / TRAIN_JSON).read_text())
    assert [c["id"] for c in doc["categories"]] == [cid for cid, _ in SHAPES]
    dest = tmp_path / "cli"
    command = [sys.executable, "-m", "wrn_cluster.cli", "data", "synth-coco", str(dest)]
    result = subprocess.run(
        [*command, "--images", "20", "--size", "64"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 15 train and 5 val JPEGs" in result.stdout
    assert len(list((dest / "val2017").glob("*.jpg"))) == 5
    coco.check(json.loads((dest / VAL_JSON).read_text()), "val")  # valid COCO


# ---------------------------------------------------------------------------------------------
# The detector and its spec


@pytest.mark.parametrize(
    ("arch", "channels"),
    [
        ("wrn-18-0.3", [19, 38, 77, 154]),  # rounded widths: not ResNet-50's 1:2:4:8 from 2048
        ("wrn-34-2", [128, 256, 512, 1024]),
        ("wrn-50-2", [256, 512, 1024, 2048]),  # torchvision's wide_resnet50_2
    ],
)
def test_fpn_reads_the_widened_stage_channels(arch, channels):
    backbone = detection_models.wrn_fpn_backbone(arch, fpn_channels=16)
    assert [block[0].in_channels for block in backbone.fpn.inner_blocks] == channels
    features = backbone(torch.rand(1, 3, 64, 64))
    assert [f.shape[1:] for f in features.values()] == [
        (16, 16, 16),
        (16, 8, 8),
        (16, 4, 4),
        (16, 2, 2),
        (16, 1, 1),
    ]


def test_trainable_layers_and_frozen_batchnorm_follow_torchvision(tmp_path):
    # A classification job's run folder: the newest checkpoint's weights start the backbone.
    for name in ("checkpoint_2026-01-01_00-00-00.000001", "checkpoint_2026-01-02_00-00-00.000001"):
        classifier = build_model("wrn-18-0.5", 10)
        (tmp_path / name).mkdir()
        checkpoint.save(tmp_path / name, {"arch": "wrn-18-0.5", "model": classifier.state_dict()})
    weights = checkpoint.read_weights(str(tmp_path), "wrn-18-0.5")
    detector = build_detector(
        "wrn-18-0.5", 4, trainable_layers=2, frozen_bn=True, backbone_weights=weights
    )
    body = detector.backbone.body
    trained = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trained == {"layer3", "layer4"}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert torch.equal(body.conv1.weight, classifier.conv1.weight)
    assert torch.equal(body.layer1[0].bn1.running_var, classifier.layer1[0].bn1.running_var)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="wrn-18-0.5 checkpoint"):
        checkpoint.read_weights(str(tmp_path), "wrn-34-2")


def test_detect_spec_defaults_are_torchvisions_recipe():
    spec = parse("kind: detect\nname: d\ndata: {url: /coco}\n")
    opt, sched = spec.optimizer, spec.schedule
    assert (opt.lr, opt.base_batch_size, opt.scale_lr_with_batch) == (0.02, 16, True)
    assert (opt.momentum, opt.nesterov, opt.weight_decay) == (0.9, False, 1e-4)
    assert (sched.epochs, sched.milestones, sched.gamma, sched.warmup_steps) == (
        26,
        [16, 22],
        0.1,
        1000,
    )
    assert spec.tracking.promotion_metric == "AP"
    assert (spec.model.layers_trained, spec.model.batchnorm_frozen) == (5, False)
    pretrained = parse(
        "kind: detect\nname: d\nmodel: {backbone_weights: s3://b/ckpt}\ndata: {url: /coco}\n"
    )
    assert (pretrained.model.layers_trained, pretrained.model.batchnorm_frozen) == (3, True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model: {arch: wrn-28-10}", "model.arch: wrn-28-10 is a CIFAR/SVHN network"),
        ("model: {frozen_bn: true}", "model.frozen_bn: a frozen BatchNorm"),
        ("model: {trainable_layers: 3}", "model.trainable_layers: freezing backbone layers"),
        ("precision: {compile: true}", "precision.compile: torch.compile is not used"),
    ],
)
def test_detect_spec_refuses_what_cannot_train(change, message):
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        parse(f"kind: detect\nname: d\ndata: {{url: /coco}}\n{change}\n")


def test_an_image_that_could_not_be_read_is_left_out_of_cocoeval_and_counted(shapes):
    from wrn_cluster.train.detect import score

    class OneBoxEverywhere(torch.nn.Module):
        def forward(self, images):
            return [
                {
                    "boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]),
                    "scores": torch.tensor([0.9]),
                    "labels": torch.tensor([1]),
                }
                for _ in images
            ]

    _, val, categories, truth = coco.build(as_spec(detect_job(shapes)))
    image, target = val[0]
    # A skipped shard's sample carries no image id of the set (shard_fetch's substitute: 0).
    unread = {**target, "image_id": 0, "skipped": True}
    found = score(
        OneBoxEverywhere(),
        [([image, image], [target, unread])],
        categories,
        truth,
        "fp32",
        torch.device("cpu"),
    )
    assert found["skipped_images"] == 1 and 0.0 <= found["AP"] <= 1.0
