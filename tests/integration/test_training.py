"""Classification training on a real local Ray: learning, exact resume after a lost worker,
bad input, storage that goes down. Bad input refused before Ray starts is in
tests/unit/test_training.py; the Jobs API path is in tests/e2e/test_jobs_api.py."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.datasets import write_digits_imagefolder
from tests.util import (
    as_spec,
    digits_job,
    final_state,
    submit_killing_a_worker,
    wait_until,
)
from tests.util import digits as digits
from wrn_cluster import driver
from wrn_cluster.train import checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=4, object_store_memory=128 * 1024**2, include_dashboard=False)
    yield ray
    ray.shutdown()


# fp32 on the CPU with fixed seeds is bitwise reproducible, so equality is the check. Dropout
# and a loader process per worker: a resume must also restore the random streams exactly and
# skip inside a DataLoader that asks its batch sampler for two iterators.
DETERMINISTIC = {"precision": {"dtype": "fp32"}, "schedule": {"epochs": 4}}
DETERMINISTIC["data"] = {"batch_size": 32, "loader_workers": 1}  # 45 steps an epoch
DETERMINISTIC["model"] = {"dropout": 0.1}


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory, local_ray):
    """One uninterrupted run: what the digits job learns, and what a resumed run must match."""
    storage = tmp_path_factory.mktemp("reference")
    spec = as_spec(digits_job(digits, storage, name="ref", **DETERMINISTIC))
    driver.prepare(spec)
    return driver.run(spec), storage


def test_wrn_learns_sklearn_digits_with_two_workers(reference):
    result, storage = reference
    assert result.metrics["epoch"] == 4
    assert result.metrics["val_top1"] >= 0.95, result.metrics
    # Every validation image counted exactly once across the two workers.
    state = final_state(storage, "ref")
    assert state["epoch"] == 4 and state["resumes"] == []
    # keep: 2 and keep_best: 1, the best by val_top1 (the newer of equals).
    history = result.metrics_dataframe.set_index("epoch")["val_top1"]
    best = max(history.index, key=lambda epoch: (history[epoch], epoch))

    def kept() -> list[int]:  # retention's last pass may end after fit()
        manifests = (storage / "ref").glob(f"checkpoint_*/{checkpoint.MANIFEST_FILE}")
        return sorted(json.loads(m.read_text())["metrics"]["epoch"] for m in manifests)

    wait_until(
        lambda: kept() == sorted({3, 4, best}),
        30,
        f"the checkpoints of epochs 3, 4 and {best} only",
    )


def test_a_worker_sigkilled_inside_an_epoch_resumes_from_its_step_with_identical_weights(
    digits, tmp_path, reference
):
    job = digits_job(
        digits,
        tmp_path / "faulty",
        name="faulty",
        checkpoint={"max_failures": 2, "every_steps": 10},
        tracking={"progress_every_s": 0.5},  # rank 0's lines inside an epoch
        **DETERMINISTIC,
    )
    job["checkpoint"]["storage"] = str(tmp_path / "faulty")
    # The first checkpoint Ray Train registers is a step checkpoint of the first epoch.
    killed, returncode, output = submit_killing_a_worker(
        job, tmp_path / "faulty.yaml", tmp_path / "faulty" / "faulty"
    )
    assert killed, output
    assert returncode == 0, output

    resumed, uninterrupted = (
        final_state(tmp_path / "faulty", "faulty"),
        final_state(reference[1], "ref"),
    )
    assert len(resumed["resumes"]) == 1, output
    # The restarted workers continued inside the epoch, after a whole number of steps.
    where = re.search(
        r"\[faulty\] resumed in epoch (\d)/4 after (\d+) samples \(step (\d+)\)", output
    )
    assert where, output
    epoch, samples, step = map(int, where.groups())
    assert step % 10 == 0 and samples == (step - 45 * (epoch - 1)) * 32 > 0, where.group(0)
    assert resumed["epoch"] == uninterrupted["epoch"] == 4
    # Inside the epochs, rank 0's line says the step, the loss, the pace and the time left.
    assert re.search(
        r"\[faulty\] epoch [1-4]/4 step \d+/45 \(\d+%\)  loss \d+\.\d{4}  \d+ img/s  "
        r"ETA epoch \S+, job ",
        output,
    ), output
    assert resumed["step"] == uninterrupted["step"] == 4 * 45
    for key, tensor in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key


def test_corrupt_jpeg_is_skipped_and_counted(tmp_path, local_ray):
    data_root = tmp_path / "data"
    write_digits_imagefolder(data_root, size=16)
    victim = sorted((data_root / "train").glob("*/*.jpg"))[0]
    victim.write_bytes(b"\xff\xd8\xff not really a jpeg")
    spec = as_spec(
        digits_job(
            data_root, tmp_path / "runs", name="corrupt", schedule={"epochs": 1, "warmup_epochs": 0}
        )
    )
    driver.prepare(spec)
    result = driver.run(spec)
    assert result.metrics["skipped_images"] == 1


def test_impossible_resources_fail_within_seconds(digits, tmp_path, local_ray):
    spec = as_spec(digits_job(digits, tmp_path, scaling={"workers": 16, "cpus_per_worker": 2}))
    started = time.monotonic()
    with pytest.raises(driver.JobError) as caught:
        driver.run(spec)
    assert time.monotonic() - started < 30  # refused up front, not after a wait for resources
    assert str(caught.value) == (
        "job 'digits' asks for 32 CPU (16 workers x 2 CPU), but the cluster has 4 CPU; lower "
        "scaling.workers, scaling.cpus_per_worker or scaling.gpus_per_worker, or add nodes"
    )


def test_storage_down_for_good_stops_the_job_clearly_and_keeps_its_checkpoints(
    digits, tmp_path, s3_server, s3_env
):
    import s3fs

    from tests.faults import Outage

    outage = Outage.in_front_of(s3_server)
    bucket = s3fs.S3FileSystem(
        key=s3_env["AWS_ACCESS_KEY_ID"],
        secret=s3_env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=s3_server,
    )
    job = digits_job(
        digits,
        "s3://checkpoints/outage",
        name="outage",
        schedule={"epochs": 3, "warmup_epochs": 0},
        scaling={"workers": 1},
        data={"batch_size": 32},  # epochs of seconds: the outage starts well before the next upload
        checkpoint={"upload_attempts": 3, "upload_backoff_s": 0.5},
    )
    spec_file = tmp_path / "outage.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    env = {**os.environ, **s3_env, "AWS_ENDPOINT_URL_S3": outage.url, "WRN_CLUSTER_LOCAL_CPUS": "4"}
    submit = [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file)]
    proc = subprocess.Popen(
        submit, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    snapshot = "checkpoints/outage/outage/checkpoint_manager_snapshot.json"
    try:
        registered = lambda: bucket.exists(snapshot) and b"checkpoint_" in bucket.cat(snapshot)  # noqa: E731
        deadline = time.monotonic() + 300
        while not registered() and proc.poll() is None and time.monotonic() < deadline:
            bucket.invalidate_cache()
            time.sleep(0.1)
        outage.go_down()  # and it stays down
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        outage.close()
    assert proc.returncode == 1, output
    (error,) = [line for line in output.splitlines() if line.startswith("error:")]
    # Whichever write the outage stops for good, the worker's checkpoint upload or the Train
    # controller's own state file after it, the job ends with one line naming the storage.
    uploads = "CheckpointUploadError: could not write the checkpoint to checkpoints/outage/"
    controller = "the checkpoint storage s3://checkpoints/outage stopped answering"
    assert uploads in error or controller in error, error
    if uploads in error:  # the worker's upload met the outage and retried first
        assert "retrying in 0.5s" in output and "3 attempts" in error
    assert "stored are untouched" in error and "submit the same job name to resume" in error

    # Nothing stored before the outage was lost: Ray's latest checkpoint is whole (manifest,
    # sizes, SHA-256) and loads; resuming from such a checkpoint is test_sigkilled_... above.
    bucket.invalidate_cache()
    latest = json.loads(bucket.cat(snapshot))["latest_checkpoint_result"]["checkpoint_dir_name"]
    stored = tmp_path / "stored"
    bucket.get(f"checkpoints/outage/outage/{latest}", str(stored), recursive=True)
    assert checkpoint.load(stored, "wrn-10-2", 10)["epoch"] >= 1
