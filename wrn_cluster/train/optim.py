"""SGD with Nesterov momentum and the two schedules the recipes use, stepped per iteration."""

from __future__ import annotations

import math

import torch
from torch import nn

from wrn_cluster.spec import JobBase

FUSED_DEVICES = ("cpu", "cuda")


def effective_lr(spec: JobBase, batch_size: int) -> float:
    opt = spec.optimizer
    if opt.scale_lr_with_batch:
        return opt.lr * batch_size / opt.base_batch_size
    return opt.lr


def build_optimizer(model: nn.Module, spec: JobBase, batch_size: int) -> torch.optim.Optimizer:
    opt = spec.optimizer
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # BN scales/shifts and biases are the 1-d parameters.
        (no_decay if param.ndim <= 1 and not opt.decay_norm_and_bias else decay).append(param)
    groups = [{"params": decay, "weight_decay": opt.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # The fused kernel updates each tensor in one pass (and checks fp16 overflow on the device);
    # `wrn-cluster bench train-step` measured it well ahead of foreach on the CPU.
    params = decay + no_decay
    fused = all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    return torch.optim.SGD(
        groups,
        lr=effective_lr(spec, batch_size),
        momentum=opt.momentum,
        nesterov=opt.nesterov and opt.momentum > 0,
        **({"fused": True} if fused else {"foreach": True}),
    )


def lr_multiplier(spec: JobBase, steps_per_epoch: int):
    """step -> lr factor: linear warmup, then the multistep drops or a cosine to zero."""
    sched = spec.schedule
    warmup_steps = sched.warmup_steps or round(sched.warmup_epochs * steps_per_epoch)
    total_steps = sched.epochs * steps_per_epoch
    milestones = [m * steps_per_epoch for m in sched.milestones]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if sched.type == "multistep":
            return sched.gamma ** sum(step >= m for m in milestones)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: JobBase, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(spec, steps_per_epoch))
