"""What an epoch needs besides the step: the loaders and the evaluation pass.

Shared by the Ray Train loop and the plain torch.distributed run that `wrn-cluster bench
ray-overhead` compares it with, so the two differ only in what Ray adds. No ray import here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from wrn_cluster.spec import ClassifyJob
from wrn_cluster.train import precision


def loaders(
    spec: ClassifyJob,
    train_set: Dataset,
    val_set: Dataset,
    rank: int,
    world: int,
    device: torch.device,
) -> tuple[DistributedSampler, DataLoader, DataLoader]:
    """(sampler, train loader, val loader) for this rank."""
    workers = spec.data.loader_workers
    options = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        # Workers live across epochs (no re-fork, S3 connections kept); the datasets keep
        # their epoch in shared memory, so each epoch's augmentation still differs.
        "persistent_workers": workers > 0,
    }
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=spec.seed)
    train_loader = DataLoader(
        train_set, batch_size=spec.per_worker_batch, sampler=sampler, drop_last=False, **options
    )
    # Each rank evaluates a disjoint slice, so no image is counted twice.
    val_loader = DataLoader(
        Subset(val_set, range(rank, len(val_set), world)),
        batch_size=spec.per_worker_batch * 2,
        **options,
    )
    return sampler, train_loader, val_loader


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    to_input: Callable[[torch.Tensor], torch.Tensor],
    dtype: str,
    device: torch.device,
    world: int,
) -> dict[str, float]:
    """val_loss, val_top1, val_top5 over every rank's slice, and the images skipped."""
    net = getattr(model, "module", model)
    net.eval()
    totals = torch.zeros(5, device=device, dtype=torch.float64)  # loss, top1, top5, seen, skipped
    for images, labels in loader:
        labels = labels.to(device, non_blocking=True)
        valid = labels >= 0
        with precision.autocast(dtype, device):
            logits = net(to_input(images)).float()
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
    seen = max(totals[3].item(), 1.0)
    return {
        "val_loss": totals[0].item() / seen,
        "val_top1": totals[1].item() / seen,
        "val_top5": totals[2].item() / seen,
        "skipped_images": int(totals[4].item()),
    }
