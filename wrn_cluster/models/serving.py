"""Networks as they ship: images in [0, 1] in, normalization inside; class logits out of a
classifier, boxes with COCO category ids out of a detector."""

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


class ServingDetector(nn.Module):
    """A trained detector with its label -> COCO category id table, ready for TorchScript
    (which stores this code with the weights, so loading needs torchvision, not this project).

    Takes a list of RGB float [3, H, W] images in [0, 1], any sizes; returns per image
    ``boxes`` [N, 4] (x1, y1, x2, y2 in that image's pixels), ``scores``, ``labels`` (1..K)
    and ``category_ids``.
    """

    def __init__(self, detector: nn.Module, category_ids: list[int]) -> None:
        super().__init__()
        self.detector = detector
        self.register_buffer("category_ids", torch.tensor([-1, *category_ids], dtype=torch.int64))

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        # An if-statement, not a ternary: TorchScript compiles only this branch when scripting.
        if torch.jit.is_scripting():  # noqa: SIM108
            # Scripted torchvision detectors always return (losses, detections).
            detections = self.detector(images)[1]
        else:
            detections = self.detector(images)
        for found in detections:  # TorchScript has no {**dict}
            found["category_ids"] = self.category_ids[found["labels"]]
        return detections
