"""Detection's own pieces of the training loop: Faster R-CNN on a WRN backbone, scored each
epoch with COCOeval on the whole val set.

The loop (``train.loop``) is the one classification runs too; what is detection's own is the
step (the detector computes its losses), the loaders (images of their own sizes, aspect-ratio
grouped) and the evaluation: every rank detects on its slice of val, rank 0 gathers the
detections and scores them with pycocotools.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Subset

from wrn_cluster import data
from wrn_cluster.data import coco
from wrn_cluster.data.shards import ShardStream
from wrn_cluster.models import build_detector
from wrn_cluster.models import detection as detection_models
from wrn_cluster.spec import DetectJob
from wrn_cluster.train import checkpoint, metrics, optim, order, precision
from wrn_cluster.train.classify import Parts
from wrn_cluster.train.order import ResumableBatches, StreamBatches, loader_generator

LOSSES = metrics.DETECTION_LOSSES
SUMS = metrics.DETECT_SUMS


def to_inputs(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """uint8 [3, H, W] images -> float in [0, 1] on the device; the detector normalizes."""
    return [image.to(device, non_blocking=True).float().div_(255) for image in images]


@dataclass
class DetectStep:
    model: nn.Module  # DDP-wrapped when there are several workers
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: str
    device: torch.device
    accum_steps: int = 1

    def __call__(
        self,
        images: list[torch.Tensor],
        targets: list[dict],
        last_micro: bool = True,
        weight: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch: (total loss, [total and each loss x images, images, skipped])."""
        wanted = [
            {"boxes": t["boxes"].to(self.device), "labels": t["labels"].to(self.device)}
            for t in targets
        ]
        # Under DDP, gradients are all-reduced once per optimizer step, not per micro-batch.
        no_sync = getattr(self.model, "no_sync", None) if not last_micro else None
        with no_sync() if no_sync else contextlib.nullcontext():
            with precision.autocast(self.dtype, self.device):
                losses = self.model(to_inputs(images, self.device), wanted)
            parts = torch.stack([losses[name].float() for name in LOSSES])
            loss = parts.sum()
            self.scaler.scale(loss * weight / self.accum_steps).backward()
        if last_micro:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        count = len(images)
        skipped = sum(bool(t["skipped"]) for t in targets)
        stats = torch.cat(
            [
                torch.cat([loss[None], parts]).detach() * count,
                torch.tensor([count, skipped], device=parts.device, dtype=parts.dtype),
            ]
        )
        return loss.detach(), stats.double()


def parts(spec: DetectJob, rank: int, device: torch.device) -> Parts:
    world = dist.get_world_size() if dist.is_initialized() else 1
    attempt = order.attempt_token(world) if spec.data.format == "shards" else "0"
    train_set, val_set, categories, val_truth = data.build_detection_datasets(spec, attempt, world)
    counts = train_set.counts if isinstance(train_set, ShardStream) else train_set.split.counts
    weights = None
    if spec.model.backbone_weights:
        weights = checkpoint.read_weights(spec.model.backbone_weights, spec.model.arch)
    options = detection_models.options(spec)
    model = build_detector(num_classes=categories.num_classes, backbone_weights=weights, **options)
    dtype = precision.resolve(spec.precision.dtype, device)
    layout = precision.memory_format(spec.precision.channels_last, dtype, device)
    return Parts(
        train_set,
        val_set,
        model.to(device, memory_format=layout),
        categories.num_classes,
        {"categories": categories.as_list(), "detector": options},
        params={f"data.train.{k}": v for k, v in counts.items()},
        val_truth=(categories, val_truth if rank == 0 else None),  # only rank 0 scores
    )


def step(spec: DetectJob, model: nn.Module, device: torch.device) -> DetectStep:
    dtype = precision.resolve(spec.precision.dtype, device)
    return DetectStep(
        model=model,
        optimizer=optim.build_optimizer(model, spec, spec.data.batch_size),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == "fp16"),
        dtype=dtype,
        device=device,
        accum_steps=spec.optimizer.grad_accum_steps,
    )


def loaders(
    spec: DetectJob,
    train_set: coco.CocoDetection | ShardStream,
    val_set: Dataset,
    rank: int,
    world: int,
    device: torch.device,
) -> tuple[ResumableBatches | StreamBatches, DataLoader, DataLoader]:
    """(the train loader's batches, train loader, val loader) for this rank; batches are lists
    of images."""
    workers = spec.data.loader_workers
    options = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0,
        "collate_fn": coco.collate,
        "generator": loader_generator(spec.seed, rank),
    }
    batch = spec.worker_batch(world)  # equal shares: the spec refuses uneven ones here
    batches: ResumableBatches | StreamBatches
    if isinstance(train_set, ShardStream):  # the stream orders and splits the epoch itself
        batches = StreamBatches(train_set, batch, rank, world, workers)
        train_loader = DataLoader(train_set, batch_size=batch, **options)
    else:
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=spec.seed)
        batches = ResumableBatches(
            coco.GroupedBatchSampler(sampler, train_set.split.wide(), batch)
            if spec.data.grouped
            else BatchSampler(sampler, batch, drop_last=False)
        )
        train_loader = DataLoader(train_set, batch_sampler=batches, **options)
    # Each rank detects on a disjoint slice; rank 0 scores the union.
    val_slice = Subset(val_set, range(rank, len(val_set), world))
    val_loader = DataLoader(val_slice, batch_size=batch, **options)
    return batches, train_loader, val_loader


def evaluate(
    model: nn.Module, loader: DataLoader, step: DetectStep, parts: Parts, rank: int, world: int
) -> dict[str, float]:
    """COCO's AP metrics of the detections on every rank's slice (scored on rank 0, then sent
    to every rank so their reports agree), and the val images that could not be read."""
    categories, ground_truth = parts.val_truth
    return score(model, loader, categories, ground_truth, step.dtype, step.device, rank, world)


@torch.no_grad()
def score(
    model: nn.Module,
    loader: DataLoader,
    categories: coco.Categories,
    ground_truth: dict[str, Any] | None,
    dtype: str,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float]:
    """The AP metrics of ``model``'s detections on ``loader`` against ``ground_truth`` (rank 0's;
    None on the others), gathered over ``world`` ranks."""
    net = getattr(model, "module", model).eval()
    category_ids = categories.category_ids()
    rows, skipped = [], 0
    for images, targets in loader:
        with precision.autocast(dtype, device):
            outputs = net(to_inputs(images, device))
        for output, target in zip(outputs, targets, strict=True):
            if target["skipped"]:  # unread: no detections of it (a skipped shard's has no id)
                skipped += 1
                continue
            boxes = output["boxes"].float().cpu().numpy()
            scores = output["scores"].float().cpu().numpy()
            labels = output["labels"].cpu().numpy()
            rows.append(
                np.column_stack(
                    [
                        np.full(len(boxes), target["image_id"]),
                        boxes[:, :2],
                        boxes[:, 2:] - boxes[:, :2],  # COCO boxes are x, y, width, height
                        scores,
                        category_ids[labels],
                    ]
                )
            )
    found = (np.concatenate(rows) if rows else np.zeros((0, 7)), skipped)
    gathered = [found]
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(found, gathered, dst=0)
    result: list[dict[str, float] | None] = [None]
    if rank == 0:
        detections = np.concatenate([rows for rows, _ in gathered])
        metrics = coco.score(ground_truth, detections)
        result = [{**metrics, "skipped_images": sum(n for _, n in gathered)}]
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]
