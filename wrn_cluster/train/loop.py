"""The classification loop each Ray Train worker runs: DDP, exact metrics, exact resume."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

from wrn_cluster import data, tracking
from wrn_cluster.models import build_model
from wrn_cluster.spec import ClassifyJob
from wrn_cluster.train import checkpoint, optim, precision


def train_classifier(config: dict[str, Any]) -> None:
    spec = ClassifyJob.model_validate(config["spec"])
    # The driver prints one line per epoch; Ray Train's per-report INFO lines would repeat it.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    torch.manual_seed(spec.seed * 1009 + rank)

    train_set, val_set, class_names = data.build_datasets(spec)
    num_classes = spec.model.num_classes or len(class_names)
    dtype = precision.resolve(spec.precision.dtype, device)
    memory_format = torch.channels_last if spec.precision.channels_last else torch.contiguous_format

    model = build_model(spec.model.arch, num_classes, dropout=spec.model.dropout)
    model = model.to(memory_format=memory_format)
    state = _restore_state(spec, num_classes)
    if state:
        model.load_state_dict(state["model"])
    model = ray.train.torch.prepare_model(model)
    step_fn = torch.compile(model) if spec.precision.compile else model

    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=spec.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=spec.per_worker_batch,
        sampler=sampler,
        num_workers=spec.data.loader_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    # Each rank evaluates a disjoint slice, so no image is counted twice.
    val_loader = DataLoader(
        Subset(val_set, range(rank, len(val_set), world)),
        batch_size=spec.per_worker_batch * 2,
        num_workers=spec.data.loader_workers,
    )
    steps_per_epoch = -(-len(train_loader) // spec.optimizer.grad_accum_steps)
    optimizer = optim.build_optimizer(model, spec, spec.data.batch_size)
    scheduler = optim.build_scheduler(optimizer, spec, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in spec.data.mean_std())

    start_epoch, resumes = 0, []
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"][rank])
        start_epoch, resumes = state["epoch"], [*state["resumes"], state["epoch"]]
    tracker = None
    if rank == 0 and config.get("tracking"):
        # The run id travels in the checkpoint, so a restarted job continues its run.
        run_id = state.get("mlflow_run_id") if state else None
        tracker = tracking.RunTracker(spec, config["tracking"], run_id=run_id)

    def lr_now() -> float:
        return optimizer.param_groups[0]["lr"]

    def to_input(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device, non_blocking=True).float().div_(255)
        return ((images - mean) / std).contiguous(memory_format=memory_format)

    job_start = time.perf_counter()
    for epoch in range(start_epoch, spec.schedule.epochs):
        epoch_start = time.perf_counter()
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        model.train()
        # Sums stay on the device; read once at the end of the epoch.
        totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss, correct, seen, skipped
        accum = spec.optimizer.grad_accum_steps
        for i, (images, labels) in enumerate(train_loader):
            labels = labels.to(device, non_blocking=True)
            last_micro = (i + 1) % accum == 0 or i + 1 == len(train_loader)
            # Gradients are all-reduced once per optimizer step, not per micro-batch.
            sync = model.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()
            with sync, precision.autocast(dtype, device):
                logits = step_fn(to_input(images))
                loss = F.cross_entropy(
                    logits.float(),
                    labels,
                    ignore_index=-1,
                    label_smoothing=spec.optimizer.label_smoothing,
                )
                scaler.scale(loss / accum).backward()
            if last_micro:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            step = scheduler.last_epoch
            if tracker and last_micro and step % spec.tracking.log_every_steps == 0:
                tracker.log_metrics({"step_train_loss": loss.item(), "step_lr": lr_now()}, step)
            valid = labels >= 0
            totals += torch.stack(
                [
                    loss.detach().double() * valid.sum(),
                    (logits.argmax(1) == labels)[valid].sum().double(),
                    valid.sum().double(),
                    (~valid).sum().double(),
                ]
            )
        if world > 1:
            dist.all_reduce(totals)
        train_time = time.perf_counter() - epoch_start
        val = _evaluate(model, val_loader, to_input, dtype, device, world)
        seen = max(totals[2].item(), 1.0)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": totals[0].item() / seen,
            "train_top1": totals[1].item() / seen,
            **val,
            "lr": lr_now(),
            "images_per_sec": (totals[2].item() + totals[3].item()) / train_time,
            "epoch_time_s": time.perf_counter() - epoch_start,
            "skipped_images": int(totals[3].item() + val.pop("skipped_images")),
            "elapsed_s": time.perf_counter() - job_start,
        }
        if tracker:
            tracker.log_metrics(metrics, step=epoch + 1)
        last = epoch + 1 == spec.schedule.epochs
        if last or (epoch + 1) % spec.checkpoint.every_epochs == 0:
            rng = [checkpoint.rng_state()]
            if world > 1:  # every rank's dropout stream, so each resumes its own
                rng = [None] * world
                dist.all_gather_object(rng, checkpoint.rng_state())
            _report_with_checkpoint(
                metrics,
                rank,
                {
                    "arch": spec.model.arch,
                    "num_classes": num_classes,
                    "class_names": class_names,
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "step": scheduler.last_epoch,
                    "rng": rng,
                    "data_order": {"seed": spec.seed, "next_epoch": epoch + 1},
                    "resumes": resumes,
                    "mlflow_run_id": tracker.run_id if tracker else None,
                    "metrics": metrics,
                },
            )
        else:
            ray.train.report(metrics)

    if tracker:
        if start_epoch < spec.schedule.epochs:  # this attempt trained: ship what it made
            tracker.ship_model(_unwrap(model), class_names, spec.image_size, metrics)
        tracker.close()


@torch.no_grad()
def _evaluate(model, loader, to_input, dtype, device, world) -> dict[str, float]:
    net = _unwrap(model)
    net.eval()
    totals = torch.zeros(5, device=device, dtype=torch.float64)  # loss, top1, top5, seen, skipped
    for images, labels in loader:
        labels = labels.to(device)
        valid = labels >= 0
        with precision.autocast(dtype, device):
            logits = net(to_input(images)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        totals += torch.stack(
            [
                F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum").double(),
                hits[valid, :1].sum().double(),
                hits[valid].sum().double(),
                valid.sum().double(),
                (~valid).sum().double(),
            ]
        )
    if world > 1:
        dist.all_reduce(totals)
    seen = max(totals[3].item(), 1.0)
    return {
        "val_loss": totals[0].item() / seen,
        "val_top1": totals[1].item() / seen,
        "val_top5": totals[2].item() / seen,
        "skipped_images": int(totals[4].item()),
    }


def _restore_state(spec: ClassifyJob, num_classes: int) -> dict[str, Any] | None:
    found = ray.train.get_checkpoint()
    if found is None:
        return None
    with found.as_directory() as directory:
        return checkpoint.load(directory, spec.model.arch, num_classes)


def _report_with_checkpoint(metrics: dict, rank: int, state: dict) -> None:
    with tempfile.TemporaryDirectory() as directory:
        found = None
        if rank == 0:
            checkpoint.save(directory, state)
            found = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=found)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
