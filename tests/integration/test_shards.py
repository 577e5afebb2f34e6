"""Packed shards on a real local Ray and moto's S3: `wrn-cluster data pack` of sklearn's digits
(real JPEGs) and of a COCO set of shapes as Ray tasks, reruns that pack only a deleted shard,
digits trained from the shards in S3, a worker SIGKILLed inside an epoch that resumes to an
uninterrupted run's weights, and a detector trained from COCO shards in S3. The format, the
order and the bad inputs without Ray: tests/unit/test_shards.py, tests/unit/test_coco_shards.py."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.unit.test_detection import as_spec as as_detect_spec
from tests.unit.test_detection import detect_job
from tests.util import (
    as_spec,
    digits_job,
    final_state,
    submit_killing_a_worker,
)
from tests.util import digits as digits
from wrn_cluster import driver
from wrn_cluster.data import coco
from wrn_cluster.data.synthetic import write_coco

pytestmark = pytest.mark.slow

SHARDS = "s3://datasets/digits-shards"
PACK_ENV = {"WRN_CLUSTER_LOCAL_CPUS": "2"}  # two pack tasks at a time: two Ray workers


@pytest.fixture(scope="module")
def bucket(s3_env, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(
        key=s3_env["AWS_ACCESS_KEY_ID"],
        secret=s3_env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=s3_server,
    )
    if not fs.exists("datasets"):
        fs.mkdir("datasets")
    return fs


def pack(source, env, dst=SHARDS, *options, per_shard=300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "wrn_cluster.cli", "data", "pack", str(source), dst]
    return subprocess.run(
        [*command, "--images-per-shard", str(per_shard), *options],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env, **PACK_ENV},
    )


@pytest.fixture(scope="module")
def packed(digits, s3_env, bucket):
    run = pack(digits, s3_env)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_packing_on_ray_writes_every_image_and_a_manifest_that_matches_the_shards(packed, bucket):
    manifest = json.loads(bucket.cat("datasets/digits-shards/manifest.json"))
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["samples"], val["samples"], train["left_out"]) == (1438, 359, 0)
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert [s["samples"] for s in train["shards"]] == [300, 300, 300, 300, 238]
    for shard in train["shards"] + val["shards"]:
        data = bucket.cat(f"datasets/digits-shards/{shard['name']}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
    assert "[7/7]" in packed and "datasets/digits-shards/train: 1438 images in 5 shards" in packed


def test_a_rerun_after_a_shard_is_deleted_packs_that_shard_only(packed, digits, s3_env, bucket):
    victim = "datasets/digits-shards/train/shard.00003.mds"
    kept = bucket.cat(victim)
    others = {
        p: bucket.info(p)["LastModified"] for p in bucket.glob("datasets/digits-shards/*/*.mds")
    }
    bucket.rm(victim)
    run = pack(digits, s3_env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "; 6 already packed" in run.stdout and "[1/1] train shard 3: 300 images" in run.stdout
    bucket.invalidate_cache()
    assert bucket.cat(victim) == kept  # the same bytes again
    for path, modified in others.items():
        if path != victim:
            assert bucket.info(path)["LastModified"] == modified, path


@pytest.fixture(scope="module")
def shard_ray(packed, s3_env):
    """A local Ray whose workers read moto's S3 (the environment is read at ray.init)."""
    import ray

    saved = {key: os.environ.get(key) for key in s3_env}
    os.environ.update(s3_env)
    ray.init(num_cpus=4, object_store_memory=128 * 1024**2, include_dashboard=False)
    yield ray
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# As tests/integration/test_training.py's reference: bitwise reproducible on the CPU.
DETERMINISTIC = {
    "precision": {"dtype": "fp32"},
    "schedule": {"epochs": 4},
    "model": {"dropout": 0.1},
}
SHARD_DATA = {"format": "shards", "batch_size": 32, "loader_workers": 1}


def shard_job(storage, name, tmp_path, **sections):
    job = digits_job(SHARDS, storage, name=name, data=SHARD_DATA, **DETERMINISTIC, **sections)
    job["data"]["shard_cache"] = str(tmp_path / "cache")
    return job


@pytest.fixture(scope="module")
def from_shards(shard_ray, tmp_path_factory):
    """One uninterrupted run from the shards in S3: what it learns, and the weights a resumed
    run must end with."""
    tmp = tmp_path_factory.mktemp("from-shards")
    spec = as_spec(shard_job(tmp / "runs", "shards-ref", tmp))
    driver.prepare(spec)
    return driver.run(spec), tmp / "runs"


def test_digits_learn_from_shards_in_s3_as_from_the_folder(from_shards):
    result, storage = from_shards
    # The folder run of the same job (test_training.py) must reach 0.95 too.
    assert result.metrics["epoch"] == 4 and result.metrics["val_top1"] >= 0.95, result.metrics
    assert final_state(storage, "shards-ref")["step"] == 4 * 45  # 1438 images, batch 32


def test_a_worker_sigkilled_inside_an_epoch_of_shards_resumes_to_identical_weights(
    from_shards, tmp_path, s3_env
):
    job = shard_job(
        tmp_path / "runs",
        "shards-faulty",
        tmp_path,
        checkpoint={"max_failures": 2, "every_steps": 10},
    )
    killed, returncode, output = submit_killing_a_worker(
        job, tmp_path / "faulty.yaml", tmp_path / "runs" / "shards-faulty", s3_env
    )
    assert killed, output
    assert returncode == 0, output
    where = re.search(r"\[shards-faulty\] resumed in epoch (\d)/4 after (\d+) samples", output)
    assert where, output
    resumed, uninterrupted = (
        final_state(tmp_path / "runs", "shards-faulty"),
        final_state(from_shards[1], "shards-ref"),
    )
    assert resumed["step"] == uninterrupted["step"] and len(resumed["resumes"]) == 1
    for key, tensor in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key


# ---------------------------------------------------------------------------------------------
# COCO: shapes with their boxes, packed on Ray into S3, and a detector trained from them

COCO_SHARDS = "s3://datasets/shapes-shards"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_coco(str(root), images=120, size=96, seed=2)
    return root


@pytest.fixture(scope="module")
def coco_packed(shapes, s3_env, bucket):
    run = pack(shapes, s3_env, COCO_SHARDS, "--dataset", "coco", per_shard=24)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_a_coco_set_packs_on_ray_with_its_boxes_and_a_rerun_packs_only_a_deleted_shard(
    coco_packed, shapes, s3_env, bucket
):
    spec = as_detect_spec(detect_job(shapes))
    train, _, categories, val_doc = coco.build(spec)
    manifest = json.loads(bucket.cat("datasets/shapes-shards/manifest.json"))
    counts = manifest["splits"]["train"]["samples"], manifest["splits"]["val"]["samples"]
    assert counts == (len(train), len(val_doc["images"]))
    assert manifest["coco"]["categories"] == categories.as_list()
    assert json.loads(bucket.cat("datasets/shapes-shards/annotations/val.json")) == val_doc
    for shard in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        data = bucket.cat(f"datasets/shapes-shards/{shard['name']}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
    assert "categories -> " in coco_packed, coco_packed

    victim = "datasets/shapes-shards/train/shard.00001.mds"
    kept = bucket.cat(victim)
    bucket.rm(victim)
    run = pack(shapes, s3_env, COCO_SHARDS, "--dataset", "coco", per_shard=24)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "[1/1] train shard 1: 24 images" in run.stdout, run.stdout
    bucket.invalidate_cache()
    assert bucket.cat(victim) == kept


def test_a_detector_trains_from_coco_shards_in_s3(coco_packed, shard_ray, bucket, tmp_path):
    manifest = json.loads(bucket.cat("datasets/shapes-shards/manifest.json"))
    job = detect_job(
        COCO_SHARDS,
        tmp_path / "runs",
        name="shapes-shards",
        data={"format": "shards", "shard_cache": str(tmp_path / "cache")},
        schedule={"epochs": 2, "milestones": [1]},
        checkpoint={"every_steps": 4},
    )
    spec = as_detect_spec(job)
    driver.prepare(spec)
    metrics = driver.run(spec).metrics
    assert metrics["epoch"] == 2 and {"AP", "AP50", "train_loss_box_reg"} <= set(metrics)
    assert metrics["skipped_images"] == 0, metrics
    state = final_state(tmp_path / "runs", "shapes-shards")
    assert state["epoch"] == 2 and state["categories"] == manifest["coco"]["categories"]
