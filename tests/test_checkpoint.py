"""Checkpoint integrity: a manifest written last, partial and damaged checkpoints refused, resume
falling back to the newest complete checkpoint, and no arbitrary pickle, locally and on S3."""

from __future__ import annotations

import hashlib
import json
import pathlib
import pickle
import time
import warnings

import pytest
import torch
from ray.train import Checkpoint

from wrn_cluster.data import storage
from wrn_cluster.train import checkpoint
from wrn_cluster.train.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointMismatchError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)

ARCH, CLASSES = "wrn-10-2", 4


def training_state(epoch: int, **extra) -> dict:
    return {
        "arch": ARCH,
        "num_classes": CLASSES,
        "model": {"weight": torch.full((64, 64), float(epoch))},
        "epoch": epoch,
        "rng": [checkpoint.rng_state()],
        **extra,
    }


def test_save_writes_the_state_then_a_manifest_of_sizes_and_checksums(tmp_path):
    path = checkpoint.save(tmp_path, training_state(3))
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert path == tmp_path / STATE_FILE
    assert manifest["files"] == {
        STATE_FILE: {
            "size": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    }
    assert (tmp_path / MANIFEST_FILE).stat().st_mtime_ns >= path.stat().st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_FILE, STATE_FILE]
    state = checkpoint.load(tmp_path, ARCH, CLASSES)
    assert state["epoch"] == 3 and torch.equal(state["model"]["weight"], torch.full((64, 64), 3.0))


def _damage(directory: pathlib.Path, how: str) -> str:
    """Damage a saved checkpoint; return what the error must say."""
    state = directory / STATE_FILE
    if how == "no manifest":  # cut short before its last file
        (directory / MANIFEST_FILE).unlink()
        return f"no {MANIFEST_FILE}"
    if how == "truncated state":
        state.write_bytes(state.read_bytes()[:1000])
        return "cut short"
    if how == "one byte flipped":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
        return "SHA-256"
    if how == "state missing":
        state.unlink()
        return f"{STATE_FILE} is missing"
    if how == "manifest garbage":
        (directory / MANIFEST_FILE).write_text('{"files": [1, 2')
        return "damaged"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["no manifest", "truncated state", "one byte flipped", "state missing", "manifest garbage"],
)
def test_a_partial_or_damaged_checkpoint_is_refused_with_the_reason(tmp_path, how):
    checkpoint.save(tmp_path, training_state(1))
    expected = _damage(tmp_path, how)
    with pytest.raises(CorruptCheckpointError) as caught:
        checkpoint.load(tmp_path, ARCH, CLASSES)
    assert str(tmp_path) in str(caught.value) and expected in str(caught.value)


class Custom:
    """A class of this test module: loading it would need arbitrary pickle."""


def test_a_checkpoint_that_needs_arbitrary_pickle_is_refused_and_runs_no_code(tmp_path):
    tripwire = tmp_path / "code-ran"

    class Tripwire:
        def __reduce__(self):  # unpickling this would create the file
            return (pathlib.Path.touch, (tripwire,))

    folder = tmp_path / "ckpt"
    folder.mkdir()
    checkpoint.save(folder, training_state(1, extra=Custom()))
    with pytest.raises(UnsafeCheckpointError) as caught:
        checkpoint.load(folder, ARCH, CLASSES)
    message = str(caught.value)
    assert "tests.test_checkpoint.Custom" in message and "weights_only=True" in message
    assert "start fresh" in message

    checkpoint.save(folder, training_state(1, extra=Tripwire()))
    with pytest.raises(UnsafeCheckpointError):
        checkpoint.load(folder, ARCH, CLASSES)
    assert not tripwire.exists()
    pickle.loads(pickle.dumps(Tripwire()))  # the tripwire works: plain pickle runs it
    assert tripwire.exists()


def test_a_checkpoint_of_another_network_is_refused(tmp_path):
    checkpoint.save(tmp_path, training_state(1))
    with pytest.raises(CheckpointMismatchError, match="holds wrn-10-2 with 4 classes"):
        checkpoint.load(tmp_path, "wrn-16-2", CLASSES)


# ---------------------------------------------------------------------------------------------
# Resume: the newest complete checkpoint no newer than Ray's latest


NAMES = [f"checkpoint_2026-01-01_00-00-0{i}.000000" for i in range(1, 5)]


def local_run(tmp_path) -> list[Checkpoint]:
    """A run folder as Ray Train leaves it: checkpoint_<time> folders, epochs 1..4."""
    found = []
    for epoch, name in enumerate(NAMES, start=1):
        folder = tmp_path / "job" / name
        folder.mkdir(parents=True)
        checkpoint.save(folder, training_state(epoch))
        found.append(Checkpoint(str(folder)))
    (tmp_path / "job" / "checkpoint_manager_snapshot.json").write_text("{}")
    return found


def test_resume_uses_the_latest_checkpoint_when_it_is_complete(tmp_path):
    run = local_run(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.load_latest(run[2], ARCH, CLASSES)["epoch"] == 3


def test_resume_falls_back_to_the_newest_complete_checkpoint_before_a_broken_latest(tmp_path):
    run = local_run(tmp_path)
    _damage(pathlib.Path(run[2].path), "truncated state")
    with pytest.warns(UserWarning) as warned:
        state = checkpoint.load_latest(run[2], ARCH, CLASSES)
    assert state["epoch"] == 2  # not epoch 4: that one is newer than Ray's latest
    message = str(warned[0].message)
    assert run[2].path in message and run[1].path in message and "cut short" in message

    _damage(pathlib.Path(run[1].path), "no manifest")
    with pytest.warns(UserWarning, match=NAMES[0]):
        assert checkpoint.load_latest(run[2], ARCH, CLASSES)["epoch"] == 1

    _damage(pathlib.Path(run[0].path), "one byte flipped")
    with pytest.raises(CorruptCheckpointError) as caught:
        checkpoint.load_latest(run[2], ARCH, CLASSES)
    assert "no complete checkpoint precedes it" in str(caught.value)
    assert str(tmp_path / "job") in str(caught.value)


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
