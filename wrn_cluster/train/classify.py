"""Classification's own pieces of the training loop: datasets and network, loaders, the
per-batch step (also what `wrn-cluster bench train-step` times) and the evaluation pass.

A step takes the uint8 batch the loader gives, normalizes it on the device, runs the forward pass
under autocast, the loss and the backward pass, and on the last micro-batch of an optimizer step
the (fused) optimizer step. It never reads a value back to the host: the loss and the batch's
stats (``metrics.CLASSIFY_SUMS``) stay on the device, for the loop to sum and read once an epoch.
No ray import here: the plain-DDP baseline of `wrn-cluster bench ray-overhead` runs these too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from wrn_cluster import data
from wrn_cluster.data.shards import ShardStream
from wrn_cluster.models import build_model
from wrn_cluster.spec import ClassifyJob
from wrn_cluster.train import metrics, optim, order, precision
from wrn_cluster.train.order import (
    EpochBatches,
    ResumableBatches,
    StreamBatches,
    loader_generator,
)

SUMS = metrics.CLASSIFY_SUMS


@dataclass
class Parts:
    """What a task gives the loop before training: data, the bare network, and what a
    checkpoint keeps besides the training state."""

    train_set: Dataset
    val_set: Dataset
    model: nn.Module  # on the device's layout; the loop wraps it for DDP
    num_classes: int
    extra_state: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)  # logged once, on a fresh start
    val_truth: Any = None


def memory_format(spec: ClassifyJob, device: torch.device) -> torch.memory_format:
    """The model's layout on ``device``: the spec's, or for "auto" what pays there."""
    dtype = precision.resolve(spec.precision.dtype, device)
    return precision.memory_format(spec.precision.channels_last, dtype, device)


def parts(spec: ClassifyJob, rank: int, device: torch.device) -> Parts:
    world = dist.get_world_size() if dist.is_initialized() else 1
    attempt = order.attempt_token(world) if spec.data.format == "shards" else "0"
    train_set, val_set, class_names = data.build_datasets(spec, attempt, world)
    num_classes = spec.model.num_classes or len(class_names)
    model = build_model(spec.model.arch, num_classes, dropout=spec.model.dropout)
    model = model.to(device, memory_format=memory_format(spec, device))
    return Parts(train_set, val_set, model, num_classes, {"class_names": class_names})


def loaders(
    spec: ClassifyJob,
    train_set: Dataset,
    val_set: Dataset,
    rank: int,
    world: int,
    device: torch.device,
) -> tuple[ResumableBatches | StreamBatches, DataLoader, DataLoader]:
    """(the train loader's batches, train loader, val loader) for this rank."""
    workers = spec.data.loader_workers
    options = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        # Workers live across epochs (no re-fork, S3 connections kept); the datasets keep
        # their epoch in shared memory, so each epoch's augmentation still differs.
        "persistent_workers": workers > 0,
        "generator": loader_generator(spec.seed, rank),
    }
    batches: ResumableBatches | StreamBatches
    share = spec.worker_batch(world)  # the most a rank takes from a micro-batch
    if isinstance(train_set, ShardStream):  # the stream orders and splits the epoch itself
        batches = StreamBatches(train_set, share, rank, world, workers)
        train_loader = DataLoader(train_set, batch_size=share, **options)
    else:
        epoch_batches = EpochBatches(
            len(train_set),
            spec.global_micro_batch(),
            rank,
            world,
            spec.seed,
            repeats=spec.data.augmentation.repeats,  # copies of an item: see EpochBatches
        )
        batches = ResumableBatches(epoch_batches, order.sample_record(spec.name, rank, world))
        train_loader = DataLoader(train_set, batch_sampler=batches, **options)
    # Each rank evaluates a disjoint slice, so no image is counted twice.
    val_loader = DataLoader(
        Subset(val_set, range(rank, len(val_set), world)), batch_size=share * 2, **options
    )
    return batches, train_loader, val_loader


def to_input(
    images: torch.Tensor, device: torch.device, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """uint8 [N, 3, H, W] from the loader -> ``(x / 255 - mean) / std`` as float on the device.

    The batch stays NCHW: the first convolution of a channels_last model converts its 3-channel
    input itself, and a per-channel multiply-add is several times faster in NCHW on the CPU.
    """
    # Copied as uint8, a quarter of the bytes of the float batch.
    return images.to(device, non_blocking=True).float().mul_(scale).add_(shift)


def normalization(
    mean_std: tuple[tuple[float, ...], tuple[float, ...]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape [1, 3, 1, 1] with ``x * scale + shift == (x / 255 - mean) / std``."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in mean_std)
    return (1.0 / (255.0 * std)).to(device), (-mean / std).to(device)


def mixing(spec: ClassifyJob, num_classes: int) -> Callable | None:
    """torchvision's MixUp and/or CutMix on a normalized batch and its labels (soft labels
    out), one of the two per batch with CutMix's probability ``mix_switch``; None if off."""
    from torchvision.transforms import v2

    aug = spec.data.augmentation
    chosen, weights = [], []
    if aug.mixup:
        chosen.append(v2.MixUp(alpha=aug.mixup, num_classes=num_classes))
        weights.append(1.0 - aug.mix_switch if aug.cutmix else 1.0)
    if aug.cutmix:
        chosen.append(v2.CutMix(alpha=aug.cutmix, num_classes=num_classes))
        weights.append(aug.mix_switch if aug.mixup else 1.0)
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen, p=weights)


def sample_losses(
    logits: torch.Tensor, targets: torch.Tensor, loss: str, label_smoothing: float
) -> torch.Tensor:
    """Each sample's loss against ``targets``: class indices, or (mixed) class probabilities."""
    if loss == "binary_cross_entropy":
        if targets.dim() == 1:
            targets = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        if label_smoothing:
            targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[1]
        per_class = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return per_class.sum(1)  # summed over classes: a sample's loss on CE's scale
    return F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)


@dataclass
class TrainStep:
    model: nn.Module  # the module gradients flow through: DDP-wrapped when there are workers
    forward: Callable[[torch.Tensor], torch.Tensor]  # the model, or torch.compile of it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: str  # "fp32", "bf16" or "fp16"
    device: torch.device
    layout: torch.memory_format  # the model's; the input stays NCHW (see to_input)
    scale: torch.Tensor
    shift: torch.Tensor
    label_smoothing: float = 0.0
    accum_steps: int = 1
    loss: str = "cross_entropy"
    mix: Callable | None = None  # MixUp/CutMix (see ``mixing``)
    grad_clip_norm: float | None = None
    size: int | None = None  # progressive resizing: this epoch's size, set by the loop
    shuffle_before_mix: bool = False  # repeats: copies sit side by side; mix across them
    eval_flip: bool = False  # evaluation's flip test-time augmentation

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        return to_input(images, self.device, self.scale, self.shift)

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        last_micro: bool = True,
        weight: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch: (mean loss, [loss sum, correct, counted, skipped]) on the device.

        Label -1 marks an unreadable image: it adds nothing to the loss and is counted as skipped.
        ``weight`` scales this rank's gradient when ranks hold unequal shares of the batch
        (``order.EpochBatches.weight``); at 1.0 it changes nothing.
        """
        labels = labels.to(self.device, non_blocking=True)
        valid = labels >= 0
        counted = valid.sum()
        inputs = self.to_input(images)
        if self.size and inputs.shape[-1] != self.size:  # progressive resizing, on the device
            inputs = F.interpolate(
                inputs, size=(self.size, self.size), mode="bilinear", antialias=True
            )
        targets = labels.clamp(min=0)  # an unreadable image's -1: counted out below
        used = valid
        if self.mix is not None:
            if self.shuffle_before_mix:  # else a copy is mostly mixed with its own copy
                order = torch.randperm(len(labels)).to(self.device)
                inputs, targets, labels, valid = (
                    t[order] for t in (inputs, targets, labels, valid)
                )
            inputs, targets = self.mix(inputs, targets)
            # MixUp and CutMix pair each image with the previous one (torchvision's roll):
            # a mix with an unreadable image's blank is left out of the loss too.
            used = valid & valid.roll(1, 0)
        # Under DDP, gradients are all-reduced once per optimizer step, not per micro-batch.
        no_sync = getattr(self.model, "no_sync", None) if not last_micro else None
        with no_sync() if no_sync else contextlib.nullcontext():
            with precision.autocast(self.dtype, self.device):
                logits = self.forward(inputs).float()
            losses = sample_losses(logits, targets, self.loss, self.label_smoothing)
            loss_sum = (losses * used).sum()
            # The mean over readable images; a batch with none gives 0 (no update), not NaN.
            loss = loss_sum / used.sum().clamp(min=1)
            self.scaler.scale(loss * weight / self.accum_steps).backward()
        if last_micro:
            if self.grad_clip_norm:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
            # A fused optimizer checks fp16 overflow on the device: no sync in scaler.step.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        correct = ((logits.argmax(1) == labels) & valid).sum()
        stats = torch.stack([loss_sum.detach(), correct, counted, labels.numel() - counted])
        return loss.detach(), stats.double()


def step(
    spec: ClassifyJob, model: nn.Module, device: torch.device, num_classes: int | None = None
) -> TrainStep:
    """The step for ``model`` (on ``device`` in the spec's layout, DDP-wrapped or not);
    ``num_classes`` for MixUp/CutMix's soft labels (the model's output size if not given)."""
    if num_classes is None:
        num_classes = getattr(model, "module", model).fc.out_features
    dtype = precision.resolve(spec.precision.dtype, device)
    scale, shift = normalization(spec.data.mean_std(), device)
    if device.type == "cuda":  # fixed input shapes: let cuDNN time its kernels once and pick
        torch.backends.cudnn.benchmark = True
    return TrainStep(
        model=model,
        # Opt-in: on the CPU it gained ~2% after a 40 s+ warm-up (bench/RESULTS.md).
        # Progressive resizing compiles once per size rather than for dynamic shapes.
        forward=torch.compile(model, dynamic=False) if spec.precision.compile else model,
        optimizer=optim.build_optimizer(model, spec, spec.data.batch_size),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == "fp16"),
        dtype=dtype,
        device=device,
        layout=memory_format(spec, device),
        scale=scale,
        shift=shift,
        label_smoothing=spec.optimizer.label_smoothing,
        accum_steps=spec.optimizer.grad_accum_steps,
        loss=spec.optimizer.loss,
        mix=mixing(spec, num_classes),
        grad_clip_norm=spec.optimizer.grad_clip_norm,
        eval_flip=spec.data.eval_flip,
        shuffle_before_mix=spec.data.augmentation.repeats > 1,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    step: TrainStep,
    parts: Parts,
    rank: int,
    world: int,
) -> dict[str, float]:
    """val_loss, val_top1, val_top5 over every rank's slice, and the images skipped. With the
    step's ``eval_flip`` (test-time augmentation), an image's logits are the mean of its own
    and its mirror image's."""
    net = getattr(model, "module", model)
    net.eval()
    totals = torch.zeros(5, device=step.device, dtype=torch.float64)
    for images, labels in loader:
        labels = labels.to(step.device, non_blocking=True)
        valid = labels >= 0
        inputs = step.to_input(images)
        with precision.autocast(step.dtype, step.device):
            logits = net(inputs).float()
            if step.eval_flip:
                logits = (logits + net(inputs.flip(-1)).float()) / 2
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = (top == labels[:, None]) & valid[:, None]
        totals += torch.stack(
            [
                F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum").double(),
                hits[:, :1].sum().double(),
                hits.sum().double(),
                valid.sum().double(),
                (~valid).sum().double(),
            ]
        )
    if world > 1:
        dist.all_reduce(totals)
    loss, top1, top5, seen, skipped = totals.tolist()
    seen = max(seen, 1.0)
    return {
        "val_loss": loss / seen,
        "val_top1": top1 / seen,
        "val_top5": top5 / seen,
        "skipped_images": int(skipped),
    }
