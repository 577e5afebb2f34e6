"""One run at a time per job name and checkpoint storage, so that two submissions of the same
job never write interleaved checkpoints into one run folder: the second is refused, naming the
first.

On a Ray cluster a named actor holds the lease: the cluster's control store (GCS) registers
each actor name once, so of two drivers creating the same name only one actor starts, and it
dies with the driver that made it, so a crashed job's lease goes with it. Each
`wrn-cluster submit` without --address starts its own Ray, so there a lock on a file beside
the run folder (released by the OS when the process ends) holds the lease as well.

The lease actor's process imports this module and nothing heavier (fsspec, no torch): it starts
on the path of every job, before the trainer.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec

if TYPE_CHECKING:
    from wrn_cluster.spec import JobBase

NAMESPACE = "wrn-cluster"


class JobRunningError(Exception):
    """The same job (name and checkpoint storage) is already running."""


def holder(job_id: str | None) -> str:
    """Who holds a lease, in the words the refusal shows."""
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    who = f"submission {job_id}" if job_id else f"process {os.getpid()}"
    return f"{who} on {socket.gethostname()}, started {started}"


def _refusal(spec: JobBase, other: str) -> str:
    return (
        f"job {spec.name!r} is already running ({other}) and writes its checkpoints to "
        f"{spec.checkpoint.storage_url()}/{spec.name}; wait for it to end (`wrn-cluster status`), "
        "stop it (`wrn-cluster stop`), or give this job another name"
    )


@contextmanager
def file_lease(spec: JobBase, who: str) -> Iterator[None]:
    """Hold an exclusive lock on <storage>/.<name>.lock while the block runs; local storage
    only (object stores have no locks; a cluster's jobs hold ``cluster_lease``)."""
    url = spec.checkpoint.storage_url()
    if "://" in url and not url.startswith("file://"):
        yield
        return
    folder = Path(fsspec.core.url_to_fs(url)[1])
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # not a folder we can write: the preflight says so, with the fix
        yield
        return
    with open(folder / f".{spec.name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            other = handle.read().strip() or "another process"
            raise JobRunningError(_refusal(spec, other)) from None
        handle.truncate(0)
        handle.write(who)
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)


class _Lease:
    def __init__(self, who: str) -> None:
        self.who = who

    def holder(self) -> str:
        return self.who


@contextmanager
def cluster_lease(spec: JobBase, who: str) -> Iterator[None]:
    """Hold the job's named actor on the connected Ray cluster while the block runs."""
    import ray

    name = f"job:{spec.name}@{spec.checkpoint.storage_url()}"
    lease_class = ray.remote(num_cpus=0, max_restarts=0)(_Lease)
    try:
        lease = lease_class.options(name=name, namespace=NAMESPACE).remote(who)
        # `.remote()` checks the name only locally; the GCS decides when the actor is created.
        ray.get(lease.__ray_ready__.remote(), timeout=120)
    except (ValueError, ray.exceptions.RayActorError):  # the name is taken: that job runs
        try:
            other = ray.get(ray.get_actor(name, NAMESPACE).holder.remote(), timeout=30)
        except (ValueError, ray.exceptions.RayError):  # it ended meanwhile
            other = "another submission, just ending"
        raise JobRunningError(_refusal(spec, other)) from None
    try:
        yield
    finally:
        ray.kill(lease)
