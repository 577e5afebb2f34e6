"""What every training loop does around its own step, on a Ray Train worker: who this worker
is, resuming from the job's last checkpoint, the pass over an epoch's batches, and the report of
each epoch to MLflow (rank 0) and Ray Train, with a checkpoint when one is due.

The classification and detection loops both run their epochs in a ``WorkerRun``, so they share
one checkpoint format, one resume path and one tracker life cycle:

    run = WorkerRun(spec, config.get("tracking"))
    ...  # datasets, model (DDP-wrapped), step, loaders, scheduler
    run.resume(model, optimizer, scheduler, scaler, num_classes)
    for epoch in run.epochs():
        totals = run.train_epoch(model, train_loader, step, scheduler)
        metrics = {...}  # the loop's own evaluation
        run.report(epoch, metrics, extra_state)
    run.close()
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from wrn_cluster import tracking
from wrn_cluster.spec import JobBase
from wrn_cluster.train import checkpoint

# A step: (inputs, targets, last micro-batch of an optimizer step) -> (mean loss, stats to sum).
Step = Callable[[Any, Any, bool], tuple[torch.Tensor, torch.Tensor]]


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (or the network itself)."""
    return getattr(model, "module", model)


class WorkerRun:
    """One worker's part of a job: rank, device, seeds, the resume state and the MLflow run."""

    def __init__(self, spec: JobBase, tracking_context: dict | None) -> None:
        # The driver prints one line per epoch; Ray Train's per-report INFO lines would repeat it.
        # Some of its loggers are named after their file's path, not the module.
        for name in [*logging.root.manager.loggerDict, "ray.train"]:
            if name.startswith("ray.train") or "/ray/train/" in name:
                logging.getLogger(name).setLevel(logging.WARNING)
        ctx = ray.train.get_context()
        self.spec = spec
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
        torch.manual_seed(spec.seed * 1009 + self.rank)
        self.tracking_context = tracking_context
        self.tracker: tracking.RunTracker | None = None
        self.start_epoch, self.resumes = 0, []
        self.job_start = self.epoch_start = time.perf_counter()

    def resume(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        num_classes: int,
    ) -> None:
        """Load the job's last checkpoint (if any) into these, and open the MLflow run on rank 0:
        the one the checkpoint names, so a restarted job continues its run."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scaler, self.num_classes = scaler, num_classes
        state = None
        found = ray.train.get_checkpoint()
        if found is not None:
            # The latest complete checkpoint: a partial or damaged latest one falls back.
            state = checkpoint.load_latest(found, self.spec.model.arch, num_classes)
            # Every rank loads the same weights, so the copies DDP made at wrapping agree.
            unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            checkpoint.set_rng_state(state["rng"][self.rank])
            self.start_epoch, self.resumes = state["epoch"], [*state["resumes"], state["epoch"]]
        if self.rank == 0 and self.tracking_context:
            run_id = state.get("mlflow_run_id") if state else None
            self.tracker = tracking.RunTracker(self.spec, self.tracking_context, run_id=run_id)

    def epochs(self) -> Iterator[int]:
        """The epochs left to train, 0-based; times each one."""
        for epoch in range(self.start_epoch, self.spec.schedule.epochs):
            self.epoch_start = time.perf_counter()
            yield epoch

    def is_last(self, epoch: int) -> bool:
        return epoch + 1 == self.spec.schedule.epochs

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_epoch(
        self, model: nn.Module, loader: Iterable, step: Step, scheduler: Any
    ) -> torch.Tensor:
        """One pass over ``loader``: ``step`` per micro-batch, the schedule per optimizer step,
        the loss logged every tracking.log_every_steps; returns the step's stats summed over the
        epoch and every rank."""
        model.train()
        accum = self.spec.optimizer.grad_accum_steps
        every = self.spec.tracking.log_every_steps
        batches = len(loader)  # type: ignore[arg-type]
        totals = None
        for i, (inputs, targets) in enumerate(loader):
            last_micro = (i + 1) % accum == 0 or i + 1 == batches
            loss, stats = step(inputs, targets, last_micro)
            if last_micro:
                scheduler.step()
                if self.tracker and scheduler.last_epoch % every == 0:
                    step_metrics = {"step_train_loss": loss.item(), "step_lr": self.lr()}
                    self.tracker.log_metrics(step_metrics, scheduler.last_epoch)
            # Sums stay on the device; read once at the end of the epoch.
            totals = stats if totals is None else totals + stats
        if totals is None:
            raise RuntimeError("the training loader gave no batches; the dataset is empty")
        if self.world > 1:
            dist.all_reduce(totals)
        return totals

    def timing(self) -> dict[str, float]:
        now = time.perf_counter()
        return {"epoch_time_s": now - self.epoch_start, "elapsed_s": now - self.job_start}

    def report(self, epoch: int, metrics: dict[str, Any], extra_state: dict[str, Any]) -> None:
        """Log the epoch's metrics (rank 0) and report them to Ray Train, with a checkpoint of
        everything a resume needs (plus the loop's ``extra_state``) when one is due."""
        metrics = {"epoch": epoch + 1, **metrics}
        if self.tracker:
            self.tracker.log_metrics(metrics, step=epoch + 1)
        every = self.spec.checkpoint.every_epochs
        if not (self.is_last(epoch) or (epoch + 1) % every == 0):
            ray.train.report(metrics)
            return
        rng = [checkpoint.rng_state()]
        if self.world > 1:  # every rank's random streams, so each resumes its own
            rng = [None] * self.world
            dist.all_gather_object(rng, checkpoint.rng_state())
        with tempfile.TemporaryDirectory() as directory:
            found = None
            if self.rank == 0:
                state = {
                    "arch": self.spec.model.arch,
                    "num_classes": self.num_classes,
                    "model": unwrap(self.model).state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "epoch": epoch + 1,
                    "step": self.scheduler.last_epoch,
                    "rng": rng,
                    "data_order": {"seed": self.spec.seed, "next_epoch": epoch + 1},
                    "resumes": self.resumes,
                    "mlflow_run_id": self.tracker.run_id if self.tracker else None,
                    "metrics": metrics,
                    **extra_state,
                }
                checkpoint.save(directory, state)
                found = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=found, checkpoint_upload_fn=self._upload)

    def _upload(self, local: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
        """Store a checkpoint in the run's folder, retrying while the storage is unreachable."""
        storage = ray.train.get_context().get_storage()
        # As Ray's own upload does: a local storage path that exists only on the head node
        # (no marker here) is an error, not a checkpoint silently kept on this node's disk.
        storage._check_validation_file()
        destination = storage.build_checkpoint_path_from_name(name)
        settings = self.spec.checkpoint
        checkpoint.upload(
            local.path,
            storage.storage_filesystem,
            destination,
            settings.upload_attempts,
            settings.upload_backoff_s,
        )
        return ray.train.Checkpoint(destination, storage.storage_filesystem)

    def close(self) -> None:
        if self.tracker:
            self.tracker.close()
