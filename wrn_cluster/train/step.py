"""The per-batch training step: the code the training loop runs and `wrn-cluster bench` times.

A step takes the uint8 batch the loader gives, normalizes it on the device, runs the forward pass
under autocast, the loss and the backward pass, and on the last micro-batch of an optimizer step
the (fused) optimizer step. It never reads a value back to the host: the loss and the batch's
metrics come back as tensors on the device, for the loop to sum and read once per epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wrn_cluster.spec import ClassifyJob
from wrn_cluster.train import optim, precision

# What one step returns per batch, summed by the loop: index -> meaning.
STATS = ("loss_sum", "correct", "counted", "skipped")


def memory_format(spec: ClassifyJob, device: torch.device) -> torch.memory_format:
    """The model's layout on ``device``: the spec's, or for "auto" what pays there."""
    dtype = precision.resolve(spec.precision.dtype, device)
    return precision.memory_format(spec.precision.channels_last, dtype, device)


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

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        return to_input(images, self.device, self.scale, self.shift)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, last_micro: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch: (mean loss, [loss sum, correct, counted, skipped]) on the device.

        Label -1 marks an unreadable image: it adds nothing to the loss and is counted as skipped.
        """
        labels = labels.to(self.device, non_blocking=True)
        valid = labels >= 0
        counted = valid.sum()
        # Under DDP, gradients are all-reduced once per optimizer step, not per micro-batch.
        no_sync = getattr(self.model, "no_sync", None) if not last_micro else None
        with no_sync() if no_sync else contextlib.nullcontext():
            with precision.autocast(self.dtype, self.device):
                logits = self.forward(self.to_input(images)).float()
            loss_sum = F.cross_entropy(
                logits,
                labels,
                ignore_index=-1,
                reduction="sum",
                label_smoothing=self.label_smoothing,
            )
            # The mean over readable images; a batch with none gives 0 (no update), not NaN.
            loss = loss_sum / counted.clamp(min=1)
            self.scaler.scale(loss / self.accum_steps).backward()
        if last_micro:
            # A fused optimizer checks fp16 overflow on the device: no sync in scaler.step.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        correct = ((logits.argmax(1) == labels) & valid).sum()
        stats = torch.stack([loss_sum.detach(), correct, counted, labels.numel() - counted])
        return loss.detach(), stats.double()


def build(spec: ClassifyJob, model: nn.Module, device: torch.device) -> TrainStep:
    """The step for ``model`` (on ``device`` in the spec's layout, DDP-wrapped or not)."""
    dtype = precision.resolve(spec.precision.dtype, device)
    scale, shift = normalization(spec.data.mean_std(), device)
    if device.type == "cuda":  # fixed input shapes: let cuDNN time its kernels once and pick
        torch.backends.cudnn.benchmark = True
    return TrainStep(
        model=model,
        # Opt-in: on the CPU it gained ~2% after a 40 s+ warm-up (bench/RESULTS.md).
        forward=torch.compile(model) if spec.precision.compile else model,
        optimizer=optim.build_optimizer(model, spec, spec.data.batch_size),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == "fp16"),
        dtype=dtype,
        device=device,
        layout=memory_format(spec, device),
        scale=scale,
        shift=shift,
        label_smoothing=spec.optimizer.label_smoothing,
        accum_steps=spec.optimizer.grad_accum_steps,
    )
