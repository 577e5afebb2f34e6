"""The classification loop each Ray Train worker runs: DDP, exact metrics, exact resume."""

from __future__ import annotations

from typing import Any

import ray.train.torch

from wrn_cluster import data
from wrn_cluster.models import build_model
from wrn_cluster.spec import ClassifyJob
from wrn_cluster.train import optim
from wrn_cluster.train import step as train_step
from wrn_cluster.train.epoch import evaluate, loaders
from wrn_cluster.train.worker import WorkerRun, unwrap


def train_classifier(config: dict[str, Any]) -> None:
    spec = ClassifyJob.model_validate(config["spec"])
    run = WorkerRun(spec, config.get("tracking"))
    device = run.device

    train_set, val_set, class_names = data.build_datasets(spec)
    num_classes = spec.model.num_classes or len(class_names)
    model = build_model(spec.model.arch, num_classes, dropout=spec.model.dropout)
    model = ray.train.torch.prepare_model(
        model.to(memory_format=train_step.memory_format(spec, device))
    )
    # The per-batch step (also what `wrn-cluster bench train-step` times), with its optimizer.
    step_fn = train_step.build(spec, model, device)

    sampler, train_loader, val_loader = loaders(
        spec, train_set, val_set, run.rank, run.world, device
    )
    steps_per_epoch = -(-len(train_loader) // spec.optimizer.grad_accum_steps)
    scheduler = optim.build_scheduler(step_fn.optimizer, spec, steps_per_epoch)
    run.resume(model, step_fn.optimizer, scheduler, step_fn.scaler, num_classes)

    for epoch in run.epochs():
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        # Summed step stats: loss, correct, counted, skipped (train_step.STATS).
        totals = run.train_epoch(model, train_loader, step_fn, scheduler)
        train_time = run.timing()["epoch_time_s"]
        val = evaluate(model, val_loader, step_fn.to_input, step_fn.dtype, device, run.world)
        seen = max(totals[2].item(), 1.0)
        metrics = {
            "train_loss": totals[0].item() / seen,
            "train_top1": totals[1].item() / seen,
            **val,
            "lr": run.lr(),
            "images_per_sec": (totals[2].item() + totals[3].item()) / train_time,
            "skipped_images": int(totals[3].item() + val.pop("skipped_images")),
            **run.timing(),
        }
        if run.tracker and run.is_last(epoch):  # before the last report: a search may stop there
            run.tracker.ship_model(unwrap(model), class_names, spec.image_size)
        run.report(epoch, metrics, {"class_names": class_names})
    run.close()
