"""``kind: classify``: train a WRN on CIFAR-10/100, SVHN or ImageNet-style folders."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from wrn_cluster.spec.datasets import DATASET_FACTS
from wrn_cluster.spec.names import parse_name
from wrn_cluster.spec.sections import (
    DataSection,
    FieldError,
    JobBase,
    ModelSection,
    OptimizerSection,
    ScheduleSection,
    TrackingSection,
    absolute_if_local,
)


class ClassifyData(DataSection):
    format: Literal["files", "shards"] = Field(
        "files",
        description="files: the dataset as its own files; shards: packed by `wrn-cluster data "
        "pack`, streamed from its URL.",
    )
    shard_cache: str | None = Field(
        None,
        description="Each node's folder for streamed shards; <temp dir>/wrn-cluster-shards if "
        "unset.",
    )
    shard_cache_limit: str | None = Field(
        None,
        description="Most bytes of training shards one job keeps on a node, e.g. 200gb; "
        "unbounded if unset.",
    )
    _absolute_cache = field_validator("shard_cache")(absolute_if_local)

    @field_validator("shard_cache_limit")
    @classmethod
    def _a_size(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+(\.\d+)?\s*[kmgt]?b", value.lower()):
            raise ValueError(f"{value!r} is not a size; write it like 500mb, 200gb or 2tb")
        return value  # data.shards.size_in_bytes reads it as Streaming does

    canonical_nodes: int = Field(
        8,
        ge=1,
        description="Streaming's canonical node count: with the seed it fixes the shards' "
        "sample order; keep it for the life of a job.",
    )


class ClassifyJob(
    JobBase[ModelSection, ClassifyData, OptimizerSection, ScheduleSection, TrackingSection]
):
    model: ModelSection = Field(default_factory=ModelSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    kind: Literal["classify"]
    data: ClassifyData

    @property
    def uneven_shares(self) -> bool:
        return self.data.format == "files"  # Streaming gives every rank the same batch size

    @model_validator(mode="after")
    def _data_fits_model(self) -> ClassifyJob:
        info = parse_name(self.model.arch)
        fixed = DATASET_FACTS[self.data.dataset].image_size
        if fixed and self.data.image_size not in (None, fixed):
            raise FieldError(
                "data.image_size",
                f"{self.data.dataset} images are {fixed}x{fixed}; got {self.data.image_size}, "
                f"set it to {fixed} or leave it out",
            )
        size = self.image_size
        if size < info.total_stride:
            raise FieldError(
                "data.image_size",
                f"{size}px is smaller than {self.model.arch}'s total stride "
                f"({info.total_stride}); use at least {info.total_stride}",
            )
        if info.family != "cifar" and self.model.dropout:
            raise FieldError(
                "model.dropout",
                f"dropout is defined for the CIFAR/SVHN family only, not {self.model.arch}; "
                "set it to 0",
            )
        if self.data.format == "shards" and self.data.synthesize:
            raise FieldError(
                "data.synthesize",
                "synthetic data is written as files; remove it, or pack the files first",
            )
        if self.data.synthesize and self.data.dataset != "imagefolder":
            raise FieldError(
                "data.synthesize", "synthetic data is written as an imagefolder; remove it"
            )
        return self

    @property
    def image_size(self) -> int:
        fixed = DATASET_FACTS[self.data.dataset].image_size
        return self.data.image_size or fixed or parse_name(self.model.arch).default_image_size

    @property
    def augment(self) -> bool:
        if self.data.augment is not None:
            return self.data.augment
        return self.data.dataset != "svhn"
