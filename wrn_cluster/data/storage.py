"""The one place that turns a URL into a filesystem: local paths, file://, s3://bucket/prefix.

S3 settings come from the environment only (never from a spec), so the same job runs against AWS,
MinIO or moto by changing the environment: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), AWS_DEFAULT_REGION or AWS_REGION.
Without keys in the environment botocore's own chain (instance roles, ~/.aws) applies.
"""

from __future__ import annotations

import os
import posixpath
from typing import TYPE_CHECKING, Any

import fsspec

if TYPE_CHECKING:
    import pyarrow.fs


def s3_options(timeout_s: float | None = None) -> dict[str, Any]:
    """s3fs keyword arguments read from the environment; holds secrets, so never log it.

    With ``timeout_s``, connections and reads time out after it and nothing is retried, so a
    wrong endpoint fails in seconds (preflight) rather than after botocore's backoff.
    """
    options: dict[str, Any] = {
        # S3-compatible stores (MinIO, Ceph, moto) reject the newer default checksums.
        "config_kwargs": {
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        },
    }
    if timeout_s is not None:
        options["config_kwargs"].update(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": 1, "mode": "standard"},
        )
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options["key"], options["secret"] = key, secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            options["token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def filesystem(url: str, timeout_s: float | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a dataset or storage URL; local paths come back absolute.

    ``timeout_s`` bounds each S3 request and turns retries off (for checks that must be quick).
    """
    if url.startswith(("s3://", "s3a://")):
        import s3fs

        fs = s3fs.S3FileSystem(**s3_options(timeout_s))
        if timeout_s is not None:
            fs.retries = 1  # s3fs's own retry loop, on top of botocore's
        return fs, s3_path(fs, url)
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or "/"


def s3_path(fs: Any, url: str) -> str:
    """``bucket/key`` of an s3:// or s3a:// URL, as s3fs itself strips it (its private
    ``_strip_protocol``, pinned by tests/unit/test_data.py), without a trailing '/'."""
    return fs._strip_protocol(url).rstrip("/")


class PerProcessFilesystem:
    """The filesystem of a URL, opened again in each process that uses it (DataLoader workers,
    forked or spawned, and Ray workers): s3fs clients and their event loop do not survive a
    fork, and a pickled copy would carry the parent's connections."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._fs: fsspec.AbstractFileSystem | None = None
        self._pid = -1

    def get(self) -> fsspec.AbstractFileSystem:
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._pid = filesystem(self.url)[0], os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "_fs": None, "_pid": -1}


def train_storage(url: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig, from a storage URL.

    On S3 the pyarrow filesystem gets the endpoint and region only: every Ray process reads the
    credentials from its own environment, so none travel in the pickled run config.
    """
    if not url.startswith(("s3://", "s3a://")):
        return filesystem(url)[1], None
    import pyarrow.fs

    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        options["endpoint_override"] = host.rstrip("/")
        options["scheme"] = scheme or "https"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["region"] = region
    return url.split("://", 1)[1].rstrip("/"), pyarrow.fs.S3FileSystem(**options)


def access_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "could not reach or read the store": OS errors, and botocore's on S3."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def join(*parts: str) -> str:
    """Join path parts the way fsspec paths are written (always '/', also for local files)."""
    return posixpath.join(*parts)
