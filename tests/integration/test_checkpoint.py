"""Checkpoints on moto's S3: resume falling back to the newest complete checkpoint through the
checkpoint's own filesystem, and uploads through a store that goes down. The local checks are
in tests/unit/test_checkpoint.py."""

from __future__ import annotations

import pathlib
import time

import pytest
from ray.train import Checkpoint

from tests.unit.test_checkpoint import ARCH, CLASSES, NAMES, training_state
from wrn_cluster.data import storage
from wrn_cluster.train import checkpoint
from wrn_cluster.train.checkpoint import (
    MANIFEST_FILE,
)


def test_resume_falls_back_on_s3_through_the_checkpoints_own_filesystem(
    s3_env, monkeypatch, tmp_path
):
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    fs, prefix = storage.filesystem("s3://checkpoints/fallback-test/job")
    for epoch, name in enumerate(NAMES[:3], start=1):
        folder = tmp_path / name
        folder.mkdir()
        checkpoint.save(folder, training_state(epoch))
        if epoch == 3:  # the upload of the newest stopped before its manifest
            (folder / MANIFEST_FILE).unlink()
        fs.put(str(folder), f"{prefix}/{name}", recursive=True)
    path, arrow_fs = storage.train_storage("s3://checkpoints/fallback-test")
    latest = Checkpoint(f"{path}/job/{NAMES[2]}", arrow_fs)
    with pytest.warns(UserWarning, match="no manifest.json"):
        state = checkpoint.load_latest(latest, ARCH, CLASSES)
    assert state["epoch"] == 2


@pytest.fixture
def blinking_s3(s3_server, s3_env, monkeypatch):
    """Ray Train's S3 filesystem for the moto bucket, reached through a relay the test can cut;
    and s3fs straight to moto, to see what reached the bucket."""
    import s3fs

    from tests.faults import Outage

    outage = Outage.in_front_of(s3_server)
    for key, value in {**s3_env, "AWS_ENDPOINT_URL_S3": outage.url}.items():
        monkeypatch.setenv(key, value)
    prefix, arrow_fs = storage.train_storage("s3://checkpoints/upload-test")
    direct = s3fs.S3FileSystem(
        key=s3_env["AWS_ACCESS_KEY_ID"],
        secret=s3_env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=s3_server,
    )
    yield outage, arrow_fs, prefix, direct
    outage.close()


def _saved(tmp_path, epoch: int) -> pathlib.Path:
    folder = tmp_path / f"local-{epoch}"
    folder.mkdir()
    checkpoint.save(folder, training_state(epoch))
    return folder


def test_an_upload_retries_with_backoff_while_the_store_is_down_then_completes(
    blinking_s3, tmp_path
):
    import threading

    outage, arrow_fs, prefix, direct = blinking_s3
    outage.go_down()
    with pytest.warns(UserWarning, match=r"attempt \d of 8.*retrying in") as warned:
        # The store comes back once the upload has given up twice, whatever the SDK's own
        # retries took on this machine: a timer could end the outage before the first give-up.
        def come_back_after_two_retries():
            deadline = time.monotonic() + 240
            while len(warned) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            outage.come_back()

        threading.Thread(target=come_back_after_two_retries, daemon=True).start()
        checkpoint.upload(_saved(tmp_path, 1), arrow_fs, f"{prefix}/job/ckpt_1", 8, 0.5)
    waits = [float(str(w.message).rsplit("retrying in ", 1)[1][:-1]) for w in warned]
    assert len(waits) >= 2 and waits[:2] == [0.5, 1.0]  # doubling
    assert "attempt 1 of 8" in str(warned[0].message)
    stored = tmp_path / "stored"
    direct.get(f"{prefix}/job/ckpt_1", str(stored), recursive=True)
    assert checkpoint.load(stored, ARCH, CLASSES)["epoch"] == 1


def test_a_store_that_stays_down_fails_the_upload_clearly_and_keeps_earlier_checkpoints(
    blinking_s3, tmp_path
):
    outage, arrow_fs, prefix, direct = blinking_s3
    checkpoint.upload(_saved(tmp_path, 1), arrow_fs, f"{prefix}/job/ckpt_1", 3, 0.1)
    outage.go_down()
    with pytest.warns(UserWarning), pytest.raises(checkpoint.CheckpointUploadError) as caught:
        checkpoint.upload(_saved(tmp_path, 2), arrow_fs, f"{prefix}/job/ckpt_2", 3, 0.1)
    message = str(caught.value)
    assert f"{prefix}/job/ckpt_2" in message and "3 attempts" in message
    assert "checkpoints already stored are untouched" in message
    assert "AWS Error" not in message  # Ray Train would retry on those tokens again
    stored = tmp_path / "stored"
    direct.get(f"{prefix}/job/ckpt_1", str(stored), recursive=True)
    assert checkpoint.load(stored, ARCH, CLASSES)["epoch"] == 1
    # What reached the store of the failed one, if anything, has no manifest: never "latest".
    assert not direct.exists(f"{prefix}/job/ckpt_2/{MANIFEST_FILE}")
