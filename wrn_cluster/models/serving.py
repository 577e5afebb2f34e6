"""The network as it ships: images in [0, 1] in, class logits out, normalization inside."""

from __future__ import annotations

import torch
from torch import nn


class ServingClassifier(nn.Module):
    """Wraps a trained network with its own mean/std, so callers never normalize by hand."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)
