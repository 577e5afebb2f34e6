"""Datasets on moto's S3: an imagefolder read back from S3, and Ray Train's S3 storage. The local
datasets are in tests/unit/test_data.py."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from tests.unit.test_data import classify_spec
from wrn_cluster.data import DataError, build_datasets, prepare

# ---------------------------------------------------------------------------------------------
# S3 and the command line


def test_imagefolder_on_s3_reads_what_prepare_wrote(s3_server, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    # No region here: s3fs would send LocationConstraint=us-east-1, which S3 refuses.
    admin = s3fs.S3FileSystem(
        key="testing", secret="testing", endpoint_url=s3_server, skip_instance_cache=True
    )
    admin.mkdir("wrn-data")
    synth = {"classes": 3, "per_class": 8, "size": 24}
    spec = classify_spec(
        "imagefolder", "s3://wrn-data/synth", seed=5, image_size=16, synthesize=synth
    )
    with pytest.raises(DataError, match="s3://wrn-data/synth: no such dataset folder"):
        prepare(classify_spec("imagefolder", "s3://wrn-data/synth", image_size=16))
    prepare(spec)
    assert len(admin.find("wrn-data/synth/train")) == 18

    local = classify_spec("imagefolder", tmp_path, seed=5, image_size=16, synthesize=synth)
    prepare(local)
    s3_train, s3_val, s3_classes = build_datasets(spec)
    train, val, classes = build_datasets(local)
    assert s3_classes == classes and (len(s3_train), len(s3_val)) == (len(train), len(val))
    for i in range(len(train)):
        assert torch.equal(s3_train[i][0], train[i][0]) and s3_train[i][1] == train[i][1]

    # Loader workers open their own S3 clients (the parent's do not survive a fork).
    s3_train.set_epoch(1)
    train.set_epoch(1)
    s3_batch = next(iter(DataLoader(s3_train, batch_size=18, num_workers=2)))
    batch = next(iter(DataLoader(train, batch_size=18)))
    assert torch.equal(s3_batch[0], batch[0]) and torch.equal(s3_batch[1], batch[1])


def test_ray_train_storage_on_s3_carries_no_credentials(s3_server, monkeypatch):
    import s3fs

    from wrn_cluster.data.storage import train_storage

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-pickled")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem(
        key="testing",
        secret="secret-never-pickled",
        endpoint_url=s3_server,
        skip_instance_cache=True,
    ).mkdir("wrn-runs")
    path, fs = train_storage("s3://wrn-runs/experiments/")
    assert path == "wrn-runs/experiments"
    with fs.open_output_stream(f"{path}/hello.txt") as out:
        out.write(b"checkpoint bytes")
    copy = pickle.loads(pickle.dumps(fs))
    with copy.open_input_stream(f"{path}/hello.txt") as stream:
        assert stream.read() == b"checkpoint bytes"
    assert b"secret-never-pickled" not in pickle.dumps(fs)
    local_path, local_fs = train_storage("file:///tmp/runs/")
    assert (local_path, local_fs) == ("/tmp/runs", None)
