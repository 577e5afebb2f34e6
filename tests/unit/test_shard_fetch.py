"""A shard that cannot be downloaded (data/shard_fetch.py), without servers: its download is
tried again with backoff, then the shard is read as unreadable samples in its place, with the
epoch's order and length unchanged; and the pins on the Streaming internals this rests on. The
same against an S3 endpoint that fails (HTTP 500), for good and for a moment:
tests/integration/test_shard_fetch.py."""

from __future__ import annotations

import inspect
import logging
import shutil
from pathlib import Path

import pytest
import torch

from tests.datasets import write_cifar10
from tests.util import positions_of, shard_epoch
from wrn_cluster.data import shard_fetch, shards

SHORT_BACKOFF_S = (0.01, 0.02, 0.04)


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory) -> Path:
    """100 CIFAR-10 training images (raw pixels) in shards of 30: 30, 30, 30, 10."""
    root = tmp_path_factory.mktemp("cifar-shards")
    write_cifar10(root / "src", 20)
    shards.pack_here(str(root / "src"), str(root / "dst"), 30, "cifar10")
    return root / "dst"


def build(dst: Path, cache: Path):
    return shards.build(
        str(dst),
        size=32,
        eval_resize=32,
        augment=True,
        seed=5,
        per_worker_batch=10,
        cache=str(cache),
        cache_limit=None,
        canonical_nodes=1,
    )


def test_streamings_download_and_shard_layout_are_what_the_adapter_overrides(
    cifar_shards, tmp_path
):
    from streaming import Stream

    # RetryingStream overrides these two: a Streaming upgrade that renames or reshapes them
    # fails here first (the retries and the substitute would silently stop happening).
    download = inspect.signature(Stream._download_file)
    assert list(download.parameters) == ["self", "from_basename", "to_basename"]
    assert download.parameters["to_basename"].default is None
    assert list(inspect.signature(Stream.prepare_shard).parameters) == ["self", "shard"]
    # The read-ahead's one try: the stream's downloader, download(remote, local, timeout).
    downloader = shard_fetch.RetryingStream(
        remote=str(cifar_shards), local=str(tmp_path)
    )._downloader
    assert list(inspect.signature(downloader.download).parameters) == ["remote", "local", "timeout"]
    # What the substitute reads of a shard: one MDS file, its columns in their stored order,
    # and its sample count.
    train, _, _ = build(cifar_shards, tmp_path / "cache")
    assert isinstance(train.stream.streams[0], shard_fetch.RetryingStream)
    shard = train.stream.shards[1]
    [(raw, _)] = shard.file_pairs
    assert (raw.basename, shard.samples) == ("shard.00001.mds", 30)
    assert raw.bytes == (cifar_shards / "train" / "shard.00001.mds").stat().st_size
    assert shard.column_names == ["image", "index", "label"]
    assert shard.column_encodings == ["bytes", "int", "int"]


def test_a_shard_that_cannot_be_downloaded_is_retried_then_read_as_unreadable_samples(
    cifar_shards, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(shard_fetch, "BACKOFF_S", SHORT_BACKOFF_S)
    reference, _, _ = build(cifar_shards, tmp_path / "reference")
    expected = shard_epoch(reference)
    remote = tmp_path / "remote"
    remote.mkdir()
    for path in cifar_shards.rglob("*"):
        if path.is_file() and path.name != "shard.00001.mds":  # gone from the store mid-run
            (remote / path.relative_to(cifar_shards)).parent.mkdir(parents=True, exist_ok=True)
            (remote / path.relative_to(cifar_shards)).write_bytes(path.read_bytes())
    train, _, _ = build(remote, tmp_path / "cache")
    train.start_epoch(0, 0)
    with caplog.at_level(logging.INFO, logger=shard_fetch.__name__):
        got = list(train)
    assert len(got) == len(expected) == 100
    lost = positions_of(expected, range(30, 60))
    for i, ((image, label), (want_image, want_label, _)) in enumerate(
        zip(got, expected, strict=True)
    ):
        if i in lost:  # the missing shard's samples, where the epoch's order has them
            assert label == -1 and torch.equal(image, torch.zeros(3, 32, 32, dtype=torch.uint8))
        else:
            assert label == want_label and torch.equal(image, want_image), i
    assert len(lost) == 30
    retries = [r for r in caplog.records if "trying again" in r.getMessage()]
    assert len(retries) == len(SHORT_BACKOFF_S)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert f"skipping shard {remote}/train/shard.00001.mds: 4 tries failed" in message
    assert "its 30 samples are counted as skipped images" in message

    # Back in the store: the next epoch's start evicts the substitute, and the shard is read.
    (remote / "train" / "shard.00001.mds").write_bytes(
        (cifar_shards / "train" / "shard.00001.mds").read_bytes()
    )
    train.start_epoch(1, 0)
    again = list(train)
    assert [label for _, label in again] == [label for _, label, _ in shard_epoch(reference, 1)]
    assert not list((tmp_path / "cache" / "train").glob(f"*{shard_fetch.SKIPPED}"))


def test_a_reader_that_skips_more_than_its_share_of_shards_stops_with_the_store_named(
    cifar_shards, tmp_path, monkeypatch
):
    monkeypatch.setattr(shard_fetch, "BACKOFF_S", SHORT_BACKOFF_S)
    remote = tmp_path / "remote"
    shutil.copytree(cifar_shards, remote)
    for gone in ("shard.00001.mds", "shard.00002.mds"):  # 2 of 4: one may be skipped
        (remote / "train" / gone).unlink()
    train, _, _ = build(remote, tmp_path / "cache")
    train.start_epoch(0, 0)
    with pytest.raises(shards.DataError) as caught:
        list(train)
    message = str(caught.value)
    assert "2 of 4 shards could not be read, each after 4 tries" in message, message
    assert message.endswith(
        "check the store and its credentials, then submit the job again (it resumes from its "
        "last checkpoint)"
    )


def test_shards_are_read_ahead_only_where_each_is_read_and_fits(cifar_shards, monkeypatch):
    manifest = shards.read_manifest(str(cifar_shards))
    train_bytes = sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert shards.read_ahead_here(manifest, "train", None) == shard_fetch.READ_AHEAD
    assert shards.read_ahead_here(manifest, "train", f"{train_bytes}b") == shard_fetch.READ_AHEAD
    assert shards.read_ahead_here(manifest, "train", f"{train_bytes - 1}b") == 0  # evicts
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes: each reads part of the split
    assert shards.read_ahead_here(manifest, "train", None) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert shards.read_ahead_here(manifest, "train", None) == shard_fetch.READ_AHEAD


@pytest.mark.parametrize(
    "image_format", [shards.FILE_BYTES, {"encoding": "raw", "shape": [3, 32, 32]}]
)
@pytest.mark.parametrize("augment", [True, False])
def test_a_skipped_shards_sample_is_an_unreadable_image_of_the_readers_size(image_format, augment):
    transform = shards.ShardTransform("s3://d", 32, 36, augment, 0, image_format)
    image, label = transform({"image": b"", "label": -1, "index": -1}, 3)
    assert label == -1 and torch.equal(image, torch.zeros(3, 32, 32, dtype=torch.uint8))


def test_shards_read_ahead_give_the_epoch_unchanged_and_are_still_checked(
    cifar_shards, tmp_path, monkeypatch
):
    monkeypatch.setattr(shard_fetch, "READ_AHEAD", 0)
    plain, _, _ = build(cifar_shards, tmp_path / "plain")
    expected = shard_epoch(plain)
    assert plain.stream.streams[0].taken_ahead == 0
    monkeypatch.setattr(shard_fetch, "READ_AHEAD", 2)
    ahead, _, _ = build(cifar_shards, tmp_path / "ahead")
    got = shard_epoch(ahead)
    assert [index for *_, index in got] == [index for *_, index in expected]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(got, expected, strict=True))
    assert ahead.stream.streams[0].taken_ahead > 0  # some shard came from the read-ahead
    cached = tmp_path / "ahead" / "train"
    assert sorted(p.name for p in cached.glob("*.mds")) == sorted(
        p.name for p in (cifar_shards / "train").glob("*.mds")
    )
    assert list(cached.glob(f"*{shard_fetch.AHEAD}*")) == []  # every shard read was taken

    # A shard read ahead is checked against its SHA-256 as one Streaming downloads.
    damaged = tmp_path / "damaged"
    shutil.copytree(cifar_shards, damaged)
    shard = damaged / "train" / "shard.00003.mds"  # the last: read ahead of some other
    data = bytearray(shard.read_bytes())
    data[-50:] = bytes(50)
    shard.write_bytes(bytes(data))
    train, _, _ = build(damaged, tmp_path / "damaged-cache")
    train.start_epoch(0, 0)
    with pytest.raises(shards.DataError, match="shard.00003.mds: the shard does not match its SHA"):
        list(train)
