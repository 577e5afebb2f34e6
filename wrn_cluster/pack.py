"""`wrn-cluster data pack SRC DST`: an ImageFolder dataset, a CIFAR-10/100 or SVHN release or a
COCO set (any fsspec URL) into MDS shards on any fsspec URL, one Ray task per shard, on an
embedded Ray or on a cluster (``--address``). A release's images are read here once and put in
Ray's object store; each task reads its split's array from there without a copy.

The shards and their manifest are ``data.shards``'s; this module only spreads the parts over
Ray and reports progress. A rerun skips every part whose shard and record are already there,
so an interrupted pack finishes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from wrn_cluster import cluster
from wrn_cluster.data import shards
from wrn_cluster.data.base import DataError
from wrn_cluster.data.storage import access_errors


def pack(
    src: str,
    dst: str,
    *,
    images_per_shard: int,
    address: str | None,
    kind: str = "imagefolder",
    say: Callable[[str], None],
    cpus_per_task: float = 1.0,
    keep_empty_images: bool = False,
) -> dict[str, Any]:
    """Pack ``src`` into ``dst``; returns the manifest. Raises DataError."""
    if kind not in shards.KINDS:
        raise DataError(
            f"--dataset {kind}: packs one of {', '.join(shards.KINDS)}; name what {src} holds"
        )
    if keep_empty_images and kind != "coco":
        raise DataError(
            f"--keep-empty-images is for --dataset coco (images without boxes); {kind} images "
            "all have a label: leave it out"
        )
    import ray

    try:
        source = shards.plan(src, images_per_shard, kind, keep_empty_images)
    except access_errors() as error:
        raise DataError(
            f"{src}: cannot list the dataset ({type(error).__name__}: {error})"
        ) from None
    parts = source.parts
    counts = {
        split: sum(len(p.images) for p in split_parts) for split, split_parts in parts.items()
    }
    todo = [p for split in parts.values() for p in split if not shards.part_is_done(dst, p)]
    total = sum(len(split) for split in parts.values())
    say(
        f"{src}: {counts['train']} train and {counts['val']} val images in "
        f"{len(source.classes)} {'categories' if kind == 'coco' else 'classes'} -> "
        f"{total} shards of up to {images_per_shard} images in {dst}"
        + (f"; {total - len(todo)} already packed" if len(todo) < total else "")
    )
    started = ray.is_initialized()
    if not started:
        if address:  # the cluster's Ray itself (GCS), not its Jobs API: the tasks run there
            try:
                ray.init(address=address, logging_level="WARNING")
            except (ConnectionError, RuntimeError, ValueError) as error:
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise DataError(
                    f"--address {address}: cannot join that Ray cluster ({first}); give its "
                    "GCS address (head:6379), ray://head:10001, or auto on one of its nodes"
                ) from None
        else:
            pixels = sum(a.nbytes for a in (source.arrays or {}).values())
            ray.init(
                num_cpus=cluster.local_cpus(),
                object_store_memory=128 * 1024**2 + pixels * 5 // 4,
                include_dashboard=False,
                logging_level="WARNING",
            )
    try:
        # A store that blinks fails a task; Ray runs it again (a part is rewritten whole).
        retried = list(access_errors())
        task = ray.remote(num_cpus=cpus_per_task, max_retries=3, retry_exceptions=retried)(
            shards.pack_part
        )
        arrays = {split: ray.put(a) for split, a in (source.arrays or {}).items()}
        pending = {task.remote(src, dst, part, arrays.get(part.split)): part for part in todo}
        done, begin = 0, time.monotonic()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            part = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except ray.exceptions.RayTaskError as error:
                cause = error.cause if error.cause is not None else error
                if isinstance(cause, DataError):  # says what to change; retrying will not help
                    raise cause from None
                first = (str(cause).strip().splitlines() or [""])[0]
                raise DataError(
                    f"{dst}: packing {part.split} shard {part.number} failed, retried 3 times "
                    f"({type(cause).__name__}: {first}); run the same command again to "
                    "continue (finished shards are kept)"
                ) from None
            done += 1
            size = record["shard"]["bytes"] / 1e6 if record["shard"] else 0.0
            left = f", {len(record['left_out'])} left out" if record["left_out"] else ""
            say(
                f"  [{done}/{len(todo)}] {part.split} shard {part.number}: "
                f"{record['samples']} images, {size:.1f} MB{left}  "
                f"({time.monotonic() - begin:.0f}s)"
            )
    finally:
        if not started:
            ray.shutdown()
    manifest = shards.finish(src, dst, source, images_per_shard)
    for split, facts in manifest["splits"].items():
        mb = sum(s["bytes"] for s in facts["shards"]) / 1e6
        left = (
            f"; {facts['left_out']} images left out (did not decode)" if facts["left_out"] else ""
        )
        say(
            f"{dst}/{split}: {facts['samples']} images in {len(facts['shards'])} shards, "
            f"{mb:.1f} MB{left}"
        )
    return manifest
