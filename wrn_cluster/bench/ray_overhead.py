"""`wrn-cluster bench ray-overhead`: one epoch of the training loop as the project's Ray Train job,
against the same epoch under plain torch.distributed (processes started by
torch.multiprocessing, DDP over gloo), on the same data, network and spec, on the CPU.

Both sides run the same task pieces (``wrn_cluster.train.classify``: network, loaders, step,
evaluation, and ``metrics.Sums``) and time the training phase the same way, from the epoch's
start to its all-reduced totals: the ratio is of those images per second. Each job's wall time
(worker start-up, the epoch, evaluation, the checkpoint) is reported beside it. The Ray cluster
itself is started once, before the rounds, as a real cluster would already be up.
"""

from __future__ import annotations

import json
import math
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from wrn_cluster import trainer
from wrn_cluster.bench.common import Comparison, Say, Variant, quiet
from wrn_cluster.data.synthetic import write_imagefolder
from wrn_cluster.spec import ClassifyJob
from wrn_cluster.train import checkpoint, classify, metrics, optim

BASELINE = "plain torch.distributed: torch.multiprocessing processes, DDP over gloo"
PROJECT = "the project's Ray Train job (TorchTrainer, train.loop.train_func, checkpoint report)"


def bench_spec(
    name: str,
    data_url: str,
    storage: str,
    arch: str,
    size: int,
    batch: int,
    workers: int,
    loader_workers: int,
) -> ClassifyJob:
    return ClassifyJob.model_validate(
        {
            "kind": "classify",
            "name": name,
            "model": {"arch": arch},
            "data": {
                "dataset": "imagefolder",
                "url": data_url,
                "image_size": size,
                "eval_resize": size,
                "batch_size": batch,
                "loader_workers": loader_workers,
            },
            "schedule": {"epochs": 1, "type": "cosine", "milestones": []},
            "scaling": {"workers": workers, "cpus_per_worker": 1},
            "checkpoint": {"storage": storage, "keep": 1},
            "tracking": {"enabled": False},
        }
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plain_worker(rank: int, world: int, port: int, spec_json: dict, out: str) -> None:
    """One rank of the plain torch.distributed epoch; rank 0 writes what it measured to ``out``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    job_start = time.perf_counter()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        spec = ClassifyJob.model_validate(spec_json)
        device = torch.device("cpu")
        # As the Ray loop does: threads as CPUs reserved, a seed per rank.
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
        torch.manual_seed(spec.seed * 1009 + rank)
        parts = classify.parts(spec, rank, device)
        train_set = parts.train_set
        model = DistributedDataParallel(parts.model) if world > 1 else parts.model
        step_fn = classify.step(spec, model, device)
        sampler, train_loader, val_loader = classify.loaders(
            spec, train_set, parts.val_set, rank, world, device
        )
        steps = -(-len(train_loader) // spec.optimizer.grad_accum_steps)
        scheduler = optim.build_scheduler(step_fn.optimizer, spec, steps)

        epoch_start = time.perf_counter()
        sampler.set_epoch(0)
        train_set.set_epoch(0)
        model.train()
        sums = metrics.Sums(classify.SUMS)
        accum = spec.optimizer.grad_accum_steps
        for i, (images, labels) in enumerate(train_loader):
            last_micro = (i + 1) % accum == 0 or i + 1 == len(train_loader)
            _, batch_totals = step_fn(images, labels, last_micro)
            if last_micro:
                scheduler.step()
            sums.add(batch_totals)
        summed = sums.read(world)
        train_time = time.perf_counter() - epoch_start
        val = classify.evaluate(model, val_loader, step_fn, parts, rank, world)
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                checkpoint.save(
                    directory,
                    {
                        "model": getattr(model, "module", model).state_dict(),
                        "optimizer": step_fn.optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": 1,
                    },
                )
            result = {
                "images_per_sec": (summed["counted"] + summed["skipped"]) / train_time,
                "val_top1": val["val_top1"],
                "wall_s": time.perf_counter() - job_start,
            }
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run_plain(spec: ClassifyJob, scratch: Path, round_: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    out = scratch / f"plain-{round_}.json"
    start = time.perf_counter()
    mp.start_processes(
        plain_worker,
        args=(spec.scaling.max_workers, _free_port(), spec.model_dump(mode="json"), str(out)),
        nprocs=spec.scaling.max_workers,
        start_method="spawn",
    )
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - start  # from the launch, as fit() is timed
    return result


def _run_ray(spec: ClassifyJob) -> dict[str, Any]:
    start = time.perf_counter()
    result = trainer.build(spec).fit()
    wall = time.perf_counter() - start
    return {
        "images_per_sec": result.metrics["images_per_sec"],
        "val_top1": result.metrics["val_top1"],
        "wall_s": wall,
    }


def run(
    arch: str = "wrn-16-2",
    images: int = 4096,
    size: int = 32,
    batch: int = 64,
    workers: int = 2,
    loader_workers: int = 0,
    rounds: int = 3,
    say: Say = quiet,
) -> Comparison:
    """Alternate Ray Train and plain torch.distributed one-epoch jobs over ``rounds`` rounds."""
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            num_cpus=max(workers, torch.get_num_threads()),
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=False,  # per-report worker lines; failures still raise from fit()
            object_store_memory=128 * 1024**2,
        )
    rates: dict[str, list[float]] = {"ray": [], "plain": []}
    walls: dict[str, list[float]] = {"ray": [], "plain": []}
    try:
        with tempfile.TemporaryDirectory(prefix="wrn-bench-ray-") as scratch_dir:
            scratch = Path(scratch_dir)
            val_fraction = 0.2
            per_class = math.ceil(images / 4 / (1 - val_fraction))
            counts = write_imagefolder(
                str(scratch / "data"), 4, per_class, size + size // 4, val_fraction
            )
            say(f"wrote {counts['train']} train and {counts['val']} val JPEGs to {scratch}/data")
            for r in range(rounds):
                spec = bench_spec(
                    f"bench-ray-overhead-{r}",  # a new name each round: nothing to resume
                    str(scratch / "data"),
                    str(scratch / "runs"),
                    arch,
                    size,
                    batch,
                    workers,
                    loader_workers,
                )
                # Alternate which goes first, so neither always meets a warm page cache.
                for side in ("ray", "plain") if r % 2 == 0 else ("plain", "ray"):
                    measured = _run_ray(spec) if side == "ray" else _run_plain(spec, scratch, r)
                    rates[side].append(measured["images_per_sec"])
                    walls[side].append(measured["wall_s"])
                say(
                    f"round {r + 1}/{rounds}: ray {rates['ray'][-1]:.1f} img/s "
                    f"({walls['ray'][-1]:.1f}s job)  plain {rates['plain'][-1]:.1f} img/s "
                    f"({walls['plain'][-1]:.1f}s job)"
                )
    finally:
        if started_ray:
            ray.shutdown()
    wall_ray, wall_plain = (sorted(w)[len(w) // 2] for w in (walls["ray"], walls["plain"]))
    return Comparison(
        bench="ray-overhead",
        unit="img/s",
        baseline=Variant("plain", BASELINE, rates["plain"]),
        project=Variant("ray", PROJECT, rates["ray"]),
        settings={
            "model": arch,
            "images": counts["train"],
            "size": size,
            "batch": batch,
            "workers": workers,
            "loader_workers": loader_workers,
            "rounds": rounds,
        },
        extra={
            "job_wall_s_median": {"ray": round(wall_ray, 2), "plain": round(wall_plain, 2)},
            "job_wall_ratio_plain_over_ray": round(wall_plain / wall_ray, 3),
        },
        notes=[
            "ratio: training-phase images/s of the epoch, as the loop's images_per_sec metric; "
            "job wall time includes worker start-up, evaluation and the checkpoint"
        ],
    )
