"""One registry for every network of the paper, named as the paper names them.

The names themselves (``wrn-D-K``, which depths mean which family) are ``wrn_cluster.spec.names``,
so specs validate without torch; this module builds the networks they describe.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from wrn_cluster.models.imagenet import basic_wrn, bottleneck_wrn
from wrn_cluster.models.wrn import WideResNet
from wrn_cluster.spec.names import (
    PAPER_VARIANTS,
    Family,
    ModelInfo,
    UnknownModelError,
    parse_name,
)

__all__ = [
    "PAPER_VARIANTS",
    "Family",
    "ModelInfo",
    "UnknownModelError",
    "build_model",
    "count_params",
    "describe",
    "measure_gmacs",
    "parse_name",
]


def build_model(name: str, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Build a network by its paper name; ``dropout`` applies to the CIFAR/SVHN family."""
    info = parse_name(name)
    if info.family == "cifar":
        return WideResNet(info.depth, info.width, num_classes, dropout=dropout)
    if dropout:
        raise ValueError(f"{name}: dropout is only defined for the CIFAR/SVHN family")
    if info.family == "imagenet-basic":
        return basic_wrn(info.depth, info.width, num_classes)
    return bottleneck_wrn(info.depth, info.width, num_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_gmacs(model: nn.Module, image_size: int) -> float:
    """Multiply-accumulates per image, in billions, counted by torch.utils.flop_counter."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def describe(name: str, num_classes: int, image_size: int | None = None) -> dict:
    info = parse_name(name)
    size = image_size or info.default_image_size
    model = build_model(name, num_classes)
    return {
        "name": name,
        "family": info.family,
        "depth": info.depth,
        "width": info.width,
        "num_classes": num_classes,
        "params": count_params(model),
        "image_size": size,
        "gmacs": round(measure_gmacs(model, size), 4),
        "default_image_size": info.default_image_size,
    }
