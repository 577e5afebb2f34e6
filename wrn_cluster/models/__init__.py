"""The paper's networks by name: ``build_model("wrn-28-10", num_classes=10)``, and detectors on
them: ``build_detector("wrn-50-2", num_classes=81)``."""

from __future__ import annotations

from wrn_cluster.models.detection import build as build_detector
from wrn_cluster.models.registry import (
    PAPER_VARIANTS,
    ModelInfo,
    UnknownModelError,
    build_model,
    count_params,
    describe,
    measure_gmacs,
    parse_name,
)

__all__ = [
    "PAPER_VARIANTS",
    "ModelInfo",
    "UnknownModelError",
    "build_detector",
    "build_model",
    "count_params",
    "describe",
    "measure_gmacs",
    "parse_name",
]
