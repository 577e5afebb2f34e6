"""The paper's networks by name: ``build_model("wrn-28-10", num_classes=10)``."""

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
    "build_model",
    "count_params",
    "describe",
    "measure_gmacs",
    "parse_name",
]
