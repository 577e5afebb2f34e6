"""Job specs: one typed, validated object per YAML file, with the paper's recipes as defaults.

``load(path, overrides)`` returns a ``JobSpec`` or raises ``SpecError`` holding one readable
``FILE:LINE: field.path: message`` line per problem. The lowest layer: nothing here imports
torch, ray, mlflow or another wrn_cluster package.

- ``sections``: the sections all kinds share, and ``JobBase``
- ``classify``, ``detect``, ``tune``: one module per job kind
- ``loader``: YAML with lines, guards, ``--set``, messages, JSON schema, dumps
- ``names``: the paper's model names; ``datasets``: dataset facts
"""

from __future__ import annotations

from wrn_cluster.spec.classify import ClassifyData, ClassifyJob
from wrn_cluster.spec.datasets import (
    CIFAR_MEAN_STD,
    COCO_LAYOUT,
    DATASET_FACTS,
    IMAGENET_MEAN_STD,
    DatasetFacts,
    MeanStd,
)
from wrn_cluster.spec.detect import (
    DetectData,
    DetectJob,
    DetectModel,
    DetectOptimizer,
    DetectorSection,
    DetectSchedule,
    DetectTracking,
    SynthCocoSection,
)
from wrn_cluster.spec.loader import (
    KINDS,
    MAX_VALUES,
    JobSpec,
    Problem,
    SpecError,
    flatten,
    json_schema,
    load,
    parse,
    to_yaml,
)
from wrn_cluster.spec.names import PAPER_VARIANTS, ModelInfo, UnknownModelError, parse_name
from wrn_cluster.spec.sections import (
    ArchSection,
    CheckpointSection,
    DataSection,
    FieldError,
    JobBase,
    ModelSection,
    OptimizerSection,
    PrecisionSection,
    ScalingSection,
    ScheduleSection,
    Section,
    SynthSection,
    TrackingSection,
    absolute_if_local,
    home,
    lower_is_better,
)
from wrn_cluster.spec.tune import (
    ARCH_PARTS,
    SEARCH_KINDS,
    BudgetSection,
    SearchDim,
    TuneJob,
    TuneSection,
    arch_candidates,
    arch_name,
    arch_parts,
    trial_spec,
)

__all__ = [
    "ARCH_PARTS",
    "CIFAR_MEAN_STD",
    "COCO_LAYOUT",
    "DATASET_FACTS",
    "IMAGENET_MEAN_STD",
    "KINDS",
    "MAX_VALUES",
    "PAPER_VARIANTS",
    "SEARCH_KINDS",
    "ArchSection",
    "BudgetSection",
    "CheckpointSection",
    "ClassifyData",
    "ClassifyJob",
    "DataSection",
    "DatasetFacts",
    "DetectData",
    "DetectJob",
    "DetectModel",
    "DetectOptimizer",
    "DetectSchedule",
    "DetectTracking",
    "DetectorSection",
    "FieldError",
    "JobBase",
    "lower_is_better",
    "JobSpec",
    "MeanStd",
    "ModelInfo",
    "ModelSection",
    "OptimizerSection",
    "PrecisionSection",
    "Problem",
    "ScalingSection",
    "ScheduleSection",
    "SearchDim",
    "Section",
    "SpecError",
    "SynthCocoSection",
    "SynthSection",
    "TrackingSection",
    "TuneJob",
    "TuneSection",
    "UnknownModelError",
    "absolute_if_local",
    "arch_candidates",
    "arch_name",
    "arch_parts",
    "flatten",
    "home",
    "json_schema",
    "load",
    "parse",
    "parse_name",
    "to_yaml",
    "trial_spec",
]
