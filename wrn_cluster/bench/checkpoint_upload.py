"""`wrn-cluster bench checkpoint-upload`: training images per second of an epoch that takes step
checkpoints into a slow object store, each upload waited for against uploads in the background.

Baseline: ``checkpoint.upload: sync``, every worker waits in ``ray.train.report`` until rank 0's
checkpoint is stored. Project: ``checkpoint.upload: async`` (the default), Ray Train's ASYNC
mode: the steps go on while the checkpoint uploads, one upload at a time, and a step checkpoint
due while the previous one still uploads is skipped. Both are the project's Ray Train job
(one worker, one epoch, ``checkpoint.every_steps``) on a local Ray, storing its checkpoints in
moto's S3 with ``--delay-ms`` added to every request (``input_storage.DelayedS3``: a store far
away or overloaded). The figure is the epoch's ``images_per_sec``, the loop's own metric, timed
from the epoch's start to its last step: an upload waited for is inside it. Each job's wall
time, which also holds the last upload (Ray waits for it when the loop returns), is beside it.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from wrn_cluster import trainer
from wrn_cluster.bench.common import Comparison, Say, Variant, quiet
from wrn_cluster.bench.input_storage import CREDENTIALS, DelayedS3
from wrn_cluster.data.storage import filesystem
from wrn_cluster.data.synthetic import write_imagefolder
from wrn_cluster.spec import ClassifyJob

BUCKET = "bench-checkpoints"


def bench_spec(name: str, data_url: str, upload: str, arch: str, batch: int, every: int):
    return ClassifyJob.model_validate(
        {
            "kind": "classify",
            "name": name,
            "model": {"arch": arch},
            "data": {"dataset": "imagefolder", "url": data_url, "batch_size": batch},
            "schedule": {"epochs": 1, "type": "cosine", "milestones": [], "warmup_epochs": 0},
            "scaling": {"workers": 1, "cpus_per_worker": 1},
            "checkpoint": {
                "storage": f"s3://{BUCKET}/runs",
                "keep": 2,
                "every_steps": every,
                "upload": upload,
                "upload_backoff_s": 1,
            },
            "tracking": {"enabled": False},
        }
    )


def run(
    arch: str = "wrn-16-4",
    images: int = 1024,
    batch: int = 32,
    every_steps: int = 4,
    delay_ms: int = 400,
    rounds: int = 3,
    say: Say = quiet,
) -> Comparison:
    """Alternate sync and async one-epoch jobs over ``rounds`` rounds."""
    import ray

    saved = {key: os.environ.get(key) for key in ("AWS_ENDPOINT_URL_S3", *CREDENTIALS)}
    s3 = DelayedS3()
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL_S3=s3.url)
    rates: dict[str, list[float]] = {"sync": [], "async": []}
    walls: dict[str, list[float]] = {"sync": [], "async": []}
    checkpoint_mb = 0.0
    try:
        fs, _ = filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        # After the environment: the workers read the endpoint and credentials at ray.init.
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=False,
            object_store_memory=128 * 1024**2,
        )
        with tempfile.TemporaryDirectory(prefix="wrn-bench-upload-") as scratch_dir:
            data = str(Path(scratch_dir) / "data")
            per_class = math.ceil(images / 4 / 0.8)
            counts = write_imagefolder(data, 4, per_class, 40, 0.2)
            steps = math.ceil(counts["train"] / batch)
            say(
                f"wrote {counts['train']} train JPEGs: {steps} steps, a checkpoint every "
                f"{every_steps}, into S3 +{delay_ms} ms a request"
            )
            for r in range(rounds):
                for side in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
                    spec = bench_spec(f"upload-{side}-{r}", data, side, arch, batch, every_steps)
                    s3.delay_s = delay_ms / 1000
                    start = time.perf_counter()
                    result = trainer.build(spec).fit()
                    walls[side].append(time.perf_counter() - start)
                    s3.delay_s = 0.0
                    rates[side].append(result.metrics["images_per_sec"])
                    states = fs.glob(f"{BUCKET}/runs/{spec.name}/checkpoint_*/state.pt")
                    checkpoint_mb = max(checkpoint_mb, *(fs.size(p) / 1e6 for p in states))
                say(
                    f"round {r + 1}/{rounds}: sync {rates['sync'][-1]:.1f} img/s "
                    f"({walls['sync'][-1]:.1f}s job)  async {rates['async'][-1]:.1f} img/s "
                    f"({walls['async'][-1]:.1f}s job)"
                )
    finally:
        ray.shutdown()
        s3.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    sync, asynchronous = (statistics.median(rates[side]) for side in ("sync", "async"))
    checkpoints = steps // every_steps  # asked for inside the epoch, before skips
    stall = (counts["train"] / sync - counts["train"] / asynchronous) / max(1, checkpoints)
    extra: dict[str, Any] = {
        "job_wall_s_median": {side: round(statistics.median(w), 1) for side, w in walls.items()},
        "step_checkpoints_asked": checkpoints,
        "checkpoint_mb": round(checkpoint_mb, 1),
        "stall_per_checkpoint_s (sync - async, median)": round(stall, 2),
    }
    return Comparison(
        bench="checkpoint-upload",
        unit="img/s",
        baseline=Variant("sync", "checkpoint.upload: sync (every worker waits)", rates["sync"]),
        project=Variant(
            "async", "checkpoint.upload: async (Ray Train's ASYNC mode)", rates["async"]
        ),
        settings={
            "model": arch,
            "images": counts["train"],
            "batch": batch,
            "every_steps": every_steps,
            "delay_ms": delay_ms,
            "rounds": rounds,
        },
        extra=extra,
        notes=[
            "images/s of the epoch's steps (the loop's metric); one worker on a local Ray, "
            "checkpoints to moto's S3 with the delay on every request"
        ],
    )
