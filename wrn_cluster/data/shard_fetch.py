"""Shard downloads that outlast a bad moment of the store, and a shard that cannot be read
skipped instead of the run.

Streaming gives a download ``download_retry`` attempts and then raises, which stops every rank
of a training job. ``RetryingStream`` tries a shard's download again after waits that double
(``BACKOFF_S``), and when the last try fails too it writes a *substitute* in the shard's cache
place: an MDS shard of as many samples, each marked unreadable (``UNREADABLE``: no image bytes,
label and index -1). Streaming's order, step counts and mid-epoch resume stay as they were; the
readers give those samples back as unreadable images (label -1), which the training loop counts
in ``skipped_images``. A shard whose bytes arrive but do not match their SHA-256 is damage, not a
bad moment: that still stops the read with its name (``shards.damaged_shards_named``).

The substitute stays in this attempt's cache until Streaming evicts it (``cache_limit``); a
restarted attempt downloads the shard again (``shards.adopt_earlier_attempts`` adopts only
shards of the manifest's size).
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 1.0, 2.0)  # the waits before a download's 2nd, 3rd and 4th try
JITTER = 0.25  # each wait is longer by up to this share, so nodes do not retry in lockstep
UNREADABLE = {"image": b"", "label": -1, "index": -1}  # what a skipped sample's columns hold
TEXT_VALUES = {"bytes": b"", "str": "", "json": None, "pkl": None}  # other columns' harmless values
SUBSTITUTE_LIMIT = (1 << 32) - 1  # one MDS file for the whole substitute (MDS offsets are 32-bit)


class SubstituteError(RuntimeError):
    """The shard cannot be replaced by unreadable samples (a column of an unknown kind)."""


def _is_damage(error: BaseException) -> bool:
    """Streaming's refusal of bytes that arrived whole but are not the shard (its SHA-256 or the
    hash asked for): retrying or skipping would hide a damaged dataset."""
    text = str(error)
    return isinstance(error, ValueError) and (
        text.startswith("Checksum failure") or text.startswith("Hash algorithm")
    )


class ShardRetries:
    """What ``RetryingStream`` adds to Streaming's ``Stream``: its files downloaded with backoff
    (one Streaming attempt a try, the waits ``backoff_s`` between tries), and its shards, when
    every try failed, replaced by unreadable samples. The download is Streaming's private
    ``_download_file``, reached only through ``_download_once`` (both pinned by
    tests/unit/test_shard_fetch.py)."""

    remote: str | None
    local: str
    split: str

    def __init__(
        self,
        *,
        remote: str | None,
        local: str,
        backoff_s: Sequence[float] | None = None,
        jitter: float | None = None,
        **options: Any,
    ) -> None:
        # One Streaming attempt per try: the backoff here is the retry policy.
        super().__init__(remote=remote, local=local, download_retry=1, **options)
        self.backoff_s = tuple(BACKOFF_S if backoff_s is None else backoff_s)
        self.jitter = JITTER if jitter is None else jitter

    # -- the adapter over Streaming's private download --------------------------------------

    def _download_once(self, from_basename: str, to_basename: str | None) -> str:
        """One try of Streaming's download of ``from_basename`` into the cache; its path."""
        return super()._download_file(from_basename, to_basename)  # type: ignore[misc]

    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        """Streaming's download of a file (the index or a shard), tried again after each wait
        of ``backoff_s``; the last try's error is raised."""
        for wait in self.backoff_s:
            try:
                return self._download_once(from_basename, to_basename)
            except Exception as error:  # the store's or the SDK's: each kind has its own
                log.info(
                    "downloading %s failed (%s); trying again in %g s",
                    self.where(from_basename),
                    error,
                    wait,
                )
            time.sleep(wait * (1 + random.random() * self.jitter))
        return self._download_once(from_basename, to_basename)

    # -- a shard that cannot be downloaded -------------------------------------------------

    def prepare_shard(self, shard: Any) -> int:
        """Streaming's preparation of ``shard`` (download and SHA-256 check); if every try of
        its download fails, a substitute of unreadable samples in its place. Returns the change
        in cache usage, as Streaming counts it."""
        try:
            return super().prepare_shard(shard)  # type: ignore[misc]
        except Exception as error:
            if _is_damage(error):
                raise
            skipped = self.substitute(shard)
            log.warning(
                "skipping shard %s: %d tries failed, the last with %s: %s; its %d samples are "
                "counted as skipped images",
                self.where(shard.file_pairs[0][0].basename),
                len(self.backoff_s) + 1,
                type(error).__name__,
                error,
                skipped,
            )
            return sum(raw.bytes for raw, _ in shard.file_pairs)  # what eviction takes off

    def substitute(self, shard: Any) -> int:
        """Write an MDS shard of ``shard``'s columns and sample count, every sample unreadable,
        where the shard belongs in the cache; returns the samples."""
        from streaming import MDSWriter

        raw = shard.file_pairs[0][0]
        if len(shard.file_pairs) != 1 or not hasattr(shard, "column_encodings"):
            raise SubstituteError(f"{self.where(raw.basename)} is not one MDS file")
        columns = dict(zip(shard.column_names, shard.column_encodings, strict=True))
        sample = {name: _unreadable(name, encoding) for name, encoding in columns.items()}
        folder = os.path.join(self.local, self.split)
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".substitute-") as scratch:
            with MDSWriter(out=scratch, columns=columns, size_limit=SUBSTITUTE_LIMIT) as writer:
                for _ in range(shard.samples):
                    writer.write(sample)
            if list(writer.column_names) != list(shard.column_names):
                raise SubstituteError(
                    f"the substitute's columns {writer.column_names} are not in the shard's "
                    f"order {shard.column_names}"
                )
            os.replace(os.path.join(scratch, "shard.00000.mds"), os.path.join(folder, raw.basename))
        return shard.samples

    def where(self, basename: str) -> str:
        """The remote path of the file ``basename`` (the cache's, without a remote)."""
        return os.path.join(self.remote or self.local, self.split, basename)


def _unreadable(name: str, encoding: str) -> Any:
    """A skipped sample's value of column ``name`` of MDS ``encoding``."""
    if name in UNREADABLE:
        return UNREADABLE[name]
    if encoding in TEXT_VALUES:
        return TEXT_VALUES[encoding]
    try:
        return np.dtype(encoding).type(0)  # int, uint8, float32 ...
    except TypeError:
        raise SubstituteError(
            f"column {name} of encoding {encoding} has no harmless empty value"
        ) from None


def __getattr__(name: str) -> Any:
    """``RetryingStream``: Streaming's ``Stream`` with ``ShardRetries``, made when first asked
    for, so that Streaming (seconds to import) loads only where shards are read; pickle finds
    it here by name, as any class of this module."""
    if name != "RetryingStream":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from streaming import Stream

    made = type(
        name, (ShardRetries, Stream), {"__module__": __name__, "__doc__": ShardRetries.__doc__}
    )
    globals()[name] = made
    return made
