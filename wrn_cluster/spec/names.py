"""The paper's model names, ``wrn-DEPTH-WIDTH``, parsed without torch so specs validate anywhere.

``wrn-D-K`` resolves by depth: 18 and 34 are the basic-block ImageNet networks of Table 7,
50 and 101 the bottleneck ImageNet networks of Table 8, and any other 6n+4 depth the CIFAR/SVHN
family. ``wrn_cluster.models`` builds the networks these names describe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Family = Literal["cifar", "imagenet-basic", "imagenet-bottleneck"]

_NAME = re.compile(r"^wrn-(\d+)-(\d+(?:\.\d+)?)$")
IMAGENET_BASIC_DEPTHS = (18, 34)
IMAGENET_BOTTLENECK_DEPTHS = (50, 101)
CIFAR_DEPTHS_SHOWN = "10, 16, 22, 28, 40, 52 (any 6n+4 except 34)"

# The variants the paper reports, listed by `wrn-cluster models list`; other widths build too.
PAPER_VARIANTS = (
    "wrn-40-1",
    "wrn-40-2",
    "wrn-40-4",
    "wrn-40-8",
    "wrn-28-10",
    "wrn-28-12",
    "wrn-22-8",
    "wrn-22-10",
    "wrn-16-4",
    "wrn-16-8",
    "wrn-16-10",
    "wrn-18-1",
    "wrn-18-1.5",
    "wrn-18-2",
    "wrn-18-3",
    "wrn-34-1",
    "wrn-34-1.5",
    "wrn-34-2",
    "wrn-50-2",
    "wrn-101-2",
)


class UnknownModelError(ValueError):
    """A model name the registry cannot build; the message says what it accepts."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: Family
    depth: int
    width: float

    @property
    def default_image_size(self) -> int:
        return 32 if self.family == "cifar" else 224

    @property
    def total_stride(self) -> int:
        """How much the network shrinks its input; smaller images cannot pass through."""
        return 4 if self.family == "cifar" else 32


def parse_name(name: str) -> ModelInfo:
    match = _NAME.match(name)
    if not match:
        raise UnknownModelError(
            f"unknown model {name!r}: names are wrn-DEPTH-WIDTH, e.g. wrn-28-10 or wrn-50-2 "
            "(see `wrn-cluster models list`)"
        )
    depth, width = int(match.group(1)), float(match.group(2))
    if width <= 0:
        raise UnknownModelError(f"model {name!r}: width must be positive")
    if depth in IMAGENET_BASIC_DEPTHS:
        family: Family = "imagenet-basic"
    elif depth in IMAGENET_BOTTLENECK_DEPTHS:
        family = "imagenet-bottleneck"
    elif depth >= 10 and (depth - 4) % 6 == 0:
        family = "cifar"
    else:
        raise UnknownModelError(
            f"model {name!r}: depth {depth} is not valid; CIFAR/SVHN depths are 6n+4: "
            f"{CIFAR_DEPTHS_SHOWN}; ImageNet depths are 18, 34 (basic) and 50, 101 (bottleneck)"
        )
    return ModelInfo(name=name, family=family, depth=depth, width=width)


def arch_name(depth: int, width: float) -> str:
    """The paper name of a depth and width: ``arch_name(28, 10) == "wrn-28-10"``."""
    return f"wrn-{int(depth)}-{float(width):g}"
