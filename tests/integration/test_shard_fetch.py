"""A shard that fails mid-read on a real S3 endpoint (moto's, behind bench's DelayedS3, which
answers the GETs of a chosen shard with HTTP 500): the epoch completes in bounded time with as
many samples as ever, the failing shard's as unreadable (label -1) and every other one as a run
without failure reads it, after tries spaced by the backoff; a failure of a moment is retried
and the shard read whole. No Ray. The same without a server (a shard gone from a local store)
and the pins on Streaming: tests/unit/test_shard_fetch.py."""

from __future__ import annotations

import itertools
import logging
import time

import pytest
import torch

from tests.util import digits as digits
from tests.util import positions_of, shard_epoch
from wrn_cluster.bench.input_storage import CREDENTIALS, DelayedS3
from wrn_cluster.data import shard_fetch, shards
from wrn_cluster.data.storage import filesystem

pytestmark = pytest.mark.slow

DATA = "s3://faults/digits"
PER_SHARD = 300  # 1438 training digits: shards of 300, 300, 300, 300, 238
BACKOFF_S = (0.2, 0.4, 0.8)


@pytest.fixture(scope="module")
def store(digits):
    """The digits packed into shards on a DelayedS3, with its endpoint in the environment.
    Botocore makes one attempt per request (AWS_MAX_ATTEMPTS), so each try of a download is one
    GET the server counts; clusters keep botocore's own retries under ours."""
    s3 = DelayedS3()
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": s3.url}.items():
            env.setenv(key, value)
        env.setenv("AWS_MAX_ATTEMPTS", "1")
        fs, _ = filesystem(DATA)
        fs.mkdir("faults")
        shards.pack_here(str(digits), DATA, PER_SHARD)
        yield s3
    s3.close()


def build(cache):
    return shards.build(
        DATA,
        size=16,
        eval_resize=16,
        augment=True,
        seed=3,
        per_worker_batch=32,
        cache=str(cache),
        cache_limit=None,
        canonical_nodes=2,
    )


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    """Epoch 0 as a read without failure gives it: (image, label, index) in order."""
    train, _, _ = build(tmp_path_factory.mktemp("reference"))
    return shard_epoch(train)


@pytest.fixture
def short_backoff(monkeypatch):
    monkeypatch.setattr(shard_fetch, "BACKOFF_S", BACKOFF_S)
    monkeypatch.setattr(shard_fetch, "JITTER", 0.0)


@pytest.mark.timeout(60)
def test_a_shard_that_keeps_failing_is_retried_with_backoff_then_skipped_and_the_epoch_completes(
    store, uninterrupted, short_backoff, tmp_path, caplog
):
    failed_before = len(store.failed_at)
    store.fail("train/shard.00001.mds")
    try:
        train, _, _ = build(tmp_path / "cache")
        train.start_epoch(0, 0)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=shard_fetch.__name__):
            got = list(train)
        took = time.monotonic() - started
    finally:
        store.fail("")
    failed_at = store.failed_at[failed_before:]
    # Four GETs of the shard, each answered 500, spaced by the backoff's doubling waits.
    assert len(failed_at) == len(BACKOFF_S) + 1
    gaps = [later - earlier for earlier, later in itertools.pairwise(failed_at)]
    for gap, wait in zip(gaps, BACKOFF_S, strict=True):
        assert wait <= gap < wait + 1.0, gaps
    assert took < sum(BACKOFF_S) + 20
    # As many samples as an epoch holds, in its order: the failing shard's unreadable.
    assert len(got) == len(uninterrupted) == 1438
    lost = positions_of(uninterrupted, range(PER_SHARD, 2 * PER_SHARD))
    assert len(lost) == PER_SHARD
    for i, ((image, label), (want_image, want_label, _)) in enumerate(
        zip(got, uninterrupted, strict=True)
    ):
        if i in lost:
            assert label == -1 and not image.any(), i
        else:
            assert label == want_label and torch.equal(image, want_image), i
    [warning] = caplog.records
    assert (
        "skipping shard s3://faults/digits/train/shard.00001.mds: 4 tries failed, the last "
        "with ClientError" in warning.getMessage()
    )
    assert "its 300 samples are counted as skipped images" in warning.getMessage()


@pytest.mark.timeout(60)
def test_a_shard_that_fails_for_a_moment_is_read_whole_on_the_next_try(
    store, uninterrupted, short_backoff, tmp_path
):
    failed_before = len(store.failed_at)
    store.fail("train/shard.00003.mds", times=1)
    try:
        train, _, _ = build(tmp_path / "cache")
        got = shard_epoch(train)
    finally:
        store.fail("")
    assert len(store.failed_at) - failed_before == 1
    assert [label for _, label, _ in got] == [label for _, label, _ in uninterrupted]
    assert [index for _, _, index in got] == [index for _, _, index in uninterrupted]
    for (image, _, _), (want, _, _) in zip(got, uninterrupted, strict=True):
        assert torch.equal(image, want)
