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

A substitute leaves a marker beside it (``.skipped``); at the next epoch's start the reader
evicts those shards (``shards.ShardStream.start_epoch``), so they are downloaded again, not
blank for the rest of the run. More than ``SKIP_LIMIT`` of a stream's shards skipped by one
reader process is no bad moment but a store that is down: that stops the read with a DataError.

Read-ahead: Streaming downloads one shard at a time per reader process, when its walk through
the epoch's order first needs it, so the first batches of an epoch wait for one download after
another (a shuffle block needs nearly all of its shards early). ``RetryingStream`` starts
fetching the ``read_ahead`` shards after a shard (by number, among those not cached) whenever
Streaming asks for one. Streaming's shuffle spreads a node's shards over the whole split, so
this pays only where every shard is read by this node and none is evicted: one node, and a
cache that holds the whole split (``shards._stream`` turns it off otherwise). A fetched shard
waits beside its place (``.ahead``) until Streaming asks for it, and is then checked (SHA-256)
and counted in the cache as a download of Streaming's own; a shard asked for while its fetch
runs waits for that fetch instead of starting another. A fetch is one try through the stream's
own downloader (one client a process), without Streaming's clean-up after a failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from wrn_cluster.data.base import DataError

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 1.0, 2.0)  # the waits before a download's 2nd, 3rd and 4th try
JITTER = 0.25  # each wait is longer by up to this share, so nodes do not retry in lockstep
UNREADABLE = {"image": b"", "label": -1, "index": -1}  # what a skipped sample's columns hold
TEXT_VALUES = {"bytes": b"", "str": "", "json": None, "pkl": None}  # other columns' harmless values
SUBSTITUTE_LIMIT = (1 << 32) - 1  # one MDS file for the whole substitute (MDS offsets are 32-bit)
READ_AHEAD = 4  # shards fetched at once ahead of the one Streaming asks for (0: none)
AHEAD = ".ahead"  # a fetched shard's name beside its place, until Streaming asks for it
SKIPPED = ".skipped"  # the marker beside a substitute: evict it at the next epoch's start
SKIP_LIMIT = 0.05  # the share of a stream's shards one process may skip before it stops


class _Fetches:
    """This process's read-ahead: daemon threads (a process that exits does not wait for their
    fetches) and the shards they are fetching (cache path -> an event set when the fetch ends).
    A forked loader process makes its own (``_this_process``)."""

    def __init__(self, threads: int) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.running: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        for _ in range(threads):
            threading.Thread(target=self._work, name="shard-ahead", daemon=True).start()

    def _work(self) -> None:
        while True:
            self.jobs.get()()


_fetches: dict[int, _Fetches] = {}


def _this_process(threads: int) -> _Fetches:
    pid = os.getpid()
    if pid not in _fetches:
        _fetches[pid] = _Fetches(threads)
    return _fetches[pid]


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
    ``_download_file``, reached only through ``_download_once``, and for the read-ahead its
    private ``_downloader``, reached only through ``_fetch_once`` (all pinned by
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
        read_ahead: int | None = None,
        **options: Any,
    ) -> None:
        # One Streaming attempt per try: the backoff here is the retry policy.
        super().__init__(remote=remote, local=local, download_retry=1, **options)
        self.backoff_s = tuple(BACKOFF_S if backoff_s is None else backoff_s)
        self.jitter = JITTER if jitter is None else jitter
        self.read_ahead = READ_AHEAD if read_ahead is None else read_ahead
        self.shard_list: list[Any] = []  # this stream's shards, in their order (get_shards)
        self.taken_ahead = 0  # shards this process's Streaming took from the read-ahead
        self.skipped_shards = 0  # shards this process replaced by substitutes

    def get_shards(self, world: Any, allow_unsafe_types: bool) -> list[Any]:
        """Streaming's shard readers of this stream, kept for the read-ahead."""
        self.shard_list = super().get_shards(world, allow_unsafe_types)  # type: ignore[misc]
        return self.shard_list

    # -- the adapter over Streaming's private download --------------------------------------

    def _download_once(self, from_basename: str, to_basename: str | None) -> str:
        """One try of Streaming's download of ``from_basename`` into the cache; its path."""
        return super()._download_file(from_basename, to_basename)  # type: ignore[misc]

    def _fetch_once(self, basename: str, path: str) -> None:
        """One try at ``basename`` into ``path`` through the stream's downloader, without
        Streaming's retry, whose clean-up after a failed try would drop the client that the
        prepare thread may be using (a download under way keeps its client either way)."""
        self._downloader.download(self.where(basename), path, self.download_timeout)  # type: ignore[attr-defined]

    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        """Streaming's download of a file (the index or a shard), tried again after each wait
        of ``backoff_s``; the last try's error is raised. A shard the read-ahead fetched (or
        is fetching) is taken from there."""
        if to_basename is None:
            fetched = self.take_fetched(from_basename)
            if fetched is not None:
                return fetched
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

    # -- read-ahead ----------------------------------------------------------------------

    def fetch_ahead(self, shard: Any) -> None:
        """Start fetching the ``read_ahead`` shards after ``shard`` (by number) that are not
        in the cache, fetched or being fetched."""
        if not self.read_ahead or not self.remote or self.remote == self.local:
            return
        number = next((n for n, s in enumerate(self.shard_list) if s is shard), None)
        if number is None:
            return
        fetches = _this_process(self.read_ahead)
        for following in self.shard_list[number + 1 : number + 1 + self.read_ahead]:
            if len(following.file_pairs) != 1 or following.file_pairs[0][1] is not None:
                continue  # split or zipped shards: Streaming's own way
            basename = following.file_pairs[0][0].basename
            place = os.path.join(self.local, self.split, basename)
            with fetches.lock:
                if place in fetches.running or os.path.exists(place + AHEAD):
                    continue
                if os.path.exists(place):
                    continue
                fetches.running[place] = threading.Event()
            fetches.jobs.put(lambda basename=basename, place=place: self._fetch(basename, place))

    def _fetch(self, basename: str, place: str) -> None:
        """One try at ``basename`` into ``place`` + AHEAD, through a client of its own (the
        shard, when asked for, is tried again with backoff if this fails)."""
        fetches = _this_process(self.read_ahead)
        side = f"{place}{AHEAD}.{os.getpid()}.{threading.get_ident()}"
        try:
            self._fetch_once(basename, side)
            os.replace(side, place + AHEAD)
        except Exception as error:  # the request for the shard itself will retry and say
            log.debug("reading %s ahead failed: %s", self.where(basename), error)
            with contextlib.suppress(OSError):
                os.remove(side)
        finally:
            with fetches.lock:
                fetches.running.pop(place).set()

    def take_fetched(self, basename: str) -> str | None:
        """The cache path of ``basename`` if the read-ahead fetched it (waiting for a fetch that
        runs), else None."""
        place = os.path.join(self.local, self.split, basename)
        fetches = _this_process(self.read_ahead)
        with fetches.lock:
            running = fetches.running.get(place)
        if running is not None:
            running.wait(self.download_timeout)
        try:
            os.replace(place + AHEAD, place)
        except FileNotFoundError:
            return None
        self.taken_ahead += 1
        return place

    # -- a shard that cannot be downloaded -------------------------------------------------

    def prepare_shard(self, shard: Any) -> int:
        """Streaming's preparation of ``shard`` (download and SHA-256 check); if every try of
        its download fails, a substitute of unreadable samples in its place. Returns the change
        in cache usage, as Streaming counts it. The next shards are fetched meanwhile."""
        self.fetch_ahead(shard)
        try:
            return super().prepare_shard(shard)  # type: ignore[misc]
        except Exception as error:
            if _is_damage(error):
                raise
            self.skipped_shards += 1
            if self.skipped_shards > max(1.0, SKIP_LIMIT * len(self.shard_list)):
                raise DataError(
                    f"{self.where(shard.file_pairs[0][0].basename)}: {self.skipped_shards} of "
                    f"{len(self.shard_list)} shards could not be read, each after "
                    f"{len(self.backoff_s) + 1} tries (the last: {type(error).__name__}: "
                    f"{error}); check the store and its credentials, then submit the job again "
                    "(it resumes from its last checkpoint)"
                ) from None
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
        with open(os.path.join(folder, raw.basename + SKIPPED), "w"):
            pass  # the next epoch's start evicts the substitute (shards.ShardStream.start_epoch)
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
