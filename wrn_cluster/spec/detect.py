"""``kind: detect``: Faster R-CNN with an FPN on a WRN backbone, torchvision's COCO recipe."""

from __future__ import annotations

from typing import Literal
from urllib.parse import unquote

from pydantic import Field, field_validator, model_validator

from wrn_cluster.spec.datasets import COCO_AP_METRICS, COCO_LAYOUT
from wrn_cluster.spec.names import parse_name
from wrn_cluster.spec.sections import (
    ArchSection,
    FieldError,
    JobBase,
    OptimizerSection,
    ScheduleSection,
    Section,
    ShardedData,
    TrackingSection,
    absolute_if_local,
)


class DetectModel(ArchSection):
    """A WRN backbone under torchvision's Faster R-CNN with an FPN."""

    arch: str = Field("wrn-50-2", description="Backbone: an ImageNet WRN, wrn-18/34-K or wrn-50-2.")
    backbone_weights: str | None = Field(
        None,
        description="fsspec URL of a wrn-cluster classifier of the same arch to start the "
        "backbone from: a checkpoint's state.pt or folder, or a job's run folder (its newest "
        "checkpoint); none: from scratch.",
    )
    trainable_layers: int | None = Field(
        None,
        ge=0,
        le=5,
        description="Backbone stages trained, counted from the top (5: all); 3 with "
        "backbone_weights and 5 without, as torchvision.",
    )
    frozen_bn: bool | None = Field(
        None,
        description="Freeze the backbone's BatchNorm statistics and affine (FrozenBatchNorm2d); "
        "on with backbone_weights, off without, as torchvision.",
    )

    @property
    def layers_trained(self) -> int:
        if self.trainable_layers is not None:
            return self.trainable_layers
        return 3 if self.backbone_weights else 5

    @property
    def batchnorm_frozen(self) -> bool:
        return self.frozen_bn if self.frozen_bn is not None else bool(self.backbone_weights)


class DetectorSection(Section):
    """torchvision's Faster R-CNN settings; the defaults are torchvision's."""

    type: Literal["fasterrcnn_fpn"] = "fasterrcnn_fpn"
    fpn_channels: int = Field(256, ge=8, description="Channels of every FPN level.")
    box_head_size: int = Field(1024, ge=8, description="Width of the two-layer box head.")
    anchor_sizes: list[int] = Field(
        default_factory=lambda: [32, 64, 128, 256, 512],
        min_length=5,
        max_length=5,
        description="Anchor side per FPN level (P2..P6), in pixels of the resized image.",
    )
    rpn_train_proposals: int = Field(2000, ge=1, description="RPN proposals kept in training.")
    rpn_test_proposals: int = Field(1000, ge=1, description="RPN proposals kept in evaluation.")
    box_samples_per_image: int = Field(512, ge=1, description="RoIs sampled per training image.")
    detections_per_image: int = Field(100, ge=1)
    score_threshold: float = Field(0.05, ge=0.0, lt=1.0, description="Lowest score reported.")


class SynthCocoSection(Section):
    """Synthetic shapes in COCO format, written on first run when the dataset is missing."""

    images: int = Field(200, ge=2, description="Images in train and val together.")
    size: int = Field(96, ge=32, description="Longer image side in pixels.")
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0)


LAYOUT_FIELDS = ("train_annotations", "val_annotations", "train_images", "val_images")


class DetectData(ShardedData):
    dataset: Literal["coco"] = "coco"
    url: str = Field(
        ...,
        description="fsspec URL of a COCO root (images + annotations), or of its shards (format: "
        "shards).",
    )
    train_annotations: str = COCO_LAYOUT[0]
    val_annotations: str = COCO_LAYOUT[1]
    train_images: str = COCO_LAYOUT[2]
    val_images: str = COCO_LAYOUT[3]
    batch_size: int = Field(16, ge=1, description="Global batch size across all workers.")
    min_size: int = Field(800, ge=32, description="Shorter side the detector resizes to.")
    max_size: int = Field(1333, ge=32, description="Cap on the longer side after resizing.")
    flip: bool = Field(True, description="Horizontal flip (boxes move with it) in training.")
    keep_empty_images: bool = Field(
        False,
        description="Train on images without boxes too (torchvision drops them); shards hold "
        "them only when packed with --keep-empty-images.",
    )
    group_aspect_ratio: bool | None = Field(
        None,
        description="Batch wide images with wide, tall with tall (less padding); on for files "
        "if unset; shards come in Streaming's order, so never for them.",
    )
    loader_workers: int = Field(2, ge=0)
    synthesize: SynthCocoSection | None = Field(
        None, description="Write synthetic shapes in COCO format to url on first run."
    )

    _absolute_url = field_validator("url")(absolute_if_local)

    @property
    def grouped(self) -> bool:
        """Whether training batches are aspect-ratio groups: the files reader's default."""
        return self.format == "files" and self.group_aspect_ratio is not False

    @field_validator("train_annotations", "val_annotations", "train_images", "val_images")
    @classmethod
    def _inside_the_root(cls, path: str) -> str:
        parts = path.replace("\\", "/").rstrip("/").split("/")
        if (
            path.startswith(("/", "\\", "~"))
            or "://" in path
            or any(unquote(p) in (".", "..", "") for p in parts)
        ):
            raise ValueError(
                "a path inside data.url is expected, without a leading '/', '~', a scheme or "
                "'.'/'..' segments, e.g. annotations/instances_train2017.json"
            )
        return path


class DetectOptimizer(OptimizerSection):
    """torchvision's detection recipe: plain momentum SGD, lr 0.02 per 16 images, wd 1e-4."""

    lr: float = Field(0.02, gt=0.0)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0.0)
    scale_lr_with_batch: bool = True
    base_batch_size: int = Field(16, ge=1)


class DetectSchedule(ScheduleSection):
    """torchvision's 26-epoch recipe: x0.1 at 16 and 22, 1000 warmup steps."""

    epochs: int = Field(26, ge=1)
    milestones: list[int] = Field(default_factory=lambda: [16, 22])
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_steps: int = Field(1000, ge=0)


class DetectTracking(TrackingSection):
    promotion_metric: str = "AP"


class DetectJob(JobBase[DetectModel, DetectData, DetectOptimizer, DetectSchedule, DetectTracking]):
    model: DetectModel = Field(default_factory=DetectModel)
    optimizer: DetectOptimizer = Field(default_factory=DetectOptimizer)
    schedule: DetectSchedule = Field(default_factory=DetectSchedule)
    tracking: DetectTracking = Field(default_factory=DetectTracking)
    kind: Literal["detect"]
    data: DetectData
    detector: DetectorSection = Field(default_factory=DetectorSection)

    @model_validator(mode="after")
    def _detector_fits(self) -> DetectJob:
        info = parse_name(self.model.arch)
        if info.family == "cifar":
            raise FieldError(
                "model.arch",
                f"{self.model.arch} is a CIFAR/SVHN network; detection backbones are the "
                "ImageNet WRNs: wrn-18-K, wrn-34-K, wrn-50-K, wrn-101-K (e.g. wrn-50-2)",
            )
        model = self.model
        if not model.backbone_weights and model.layers_trained < 5:
            raise FieldError(
                "model.trainable_layers",
                "freezing backbone layers keeps their random initial weights; set "
                "model.backbone_weights or leave trainable_layers at 5",
            )
        if not model.backbone_weights and model.batchnorm_frozen:
            raise FieldError(
                "model.frozen_bn",
                "a frozen BatchNorm of a backbone trained from scratch normalizes nothing; "
                "set model.backbone_weights or frozen_bn: false",
            )
        if self.data.format == "shards":
            for name, default in zip(LAYOUT_FIELDS, COCO_LAYOUT, strict=True):
                if getattr(self.data, name) != default:
                    raise FieldError(
                        f"data.{name}",
                        "packed shards carry their images and annotations (`wrn-cluster data pack "
                        "--dataset coco` read them); remove it, or set data.format: files",
                    )
            if self.data.synthesize is not None:
                raise FieldError(
                    "data.synthesize",
                    "synthetic data is written as files; remove it, or pack the files first",
                )
            if self.data.group_aspect_ratio:
                raise FieldError(
                    "data.group_aspect_ratio",
                    "shards are read in Streaming's order, which aspect-ratio groups would change; "
                    "set it to false, or data.format: files",
                )
        if self.data.min_size > self.data.max_size:
            raise FieldError(
                "data.min_size",
                f"min_size {self.data.min_size} is above max_size {self.data.max_size}; "
                "lower min_size or raise max_size",
            )
        if self.precision.compile:
            raise FieldError(
                "precision.compile",
                "torch.compile is not used for detection (dynamic shapes); set it to false",
            )
        if self.optimizer.label_smoothing:
            raise FieldError(
                "optimizer.label_smoothing", "label smoothing is for classification; set it to 0"
            )
        return self

    def evaluation_metrics(self) -> list[str]:
        return list(COCO_AP_METRICS)
