"""Job specs: one typed, validated object per YAML file, with the paper's recipes as defaults.

``load(path, overrides)`` returns a ``JobSpec`` or raises ``SpecError`` holding one readable
``FILE:LINE: field.path: message`` line per problem. Nothing here imports torch, ray or mlflow.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from wrn_cluster.models.registry import UnknownModelError, parse_name


def home() -> Path:
    """Where the embedded defaults keep files: ``WRN_CLUSTER_HOME`` or ``./.wrn-cluster``."""
    return Path(os.environ.get("WRN_CLUSTER_HOME", ".wrn-cluster")).absolute()


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def absolute_if_local(url: str | None) -> str | None:
    """Relative local paths mean 'from where I ran the command', also inside Ray workers,
    whose working directory is not the user's. A URL with a scheme is used as written, so it
    may not climb out of its prefix with '.' or '..' segments (plain or %-encoded)."""
    if url is None:
        return url
    if "://" in url:
        path = url.split("://", 1)[1]
        if any(unquote(part) in (".", "..") for part in path.replace("\\", "/").split("/")):
            raise ValueError(
                "'.' and '..' segments are not allowed in a URL; write the folder it means, "
                "e.g. s3://bucket/datasets/imagenet"
            )
        return url
    return os.path.abspath(os.path.expanduser(url))


# Fixed-size datasets and what they hold; imagefolder takes its classes from the folders.
DATASET_FACTS: dict[str, dict[str, Any]] = {
    "cifar10": {"num_classes": 10, "image_size": 32},
    "cifar100": {"num_classes": 100, "image_size": 32},
    "svhn": {"num_classes": 10, "image_size": 32},
    "imagefolder": {},
}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR_MEAN_STD = ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255))


class ModelSection(Section):
    arch: str = Field("wrn-28-10", description="Paper name, e.g. wrn-28-10, wrn-50-2.")
    num_classes: int | None = Field(
        None, ge=2, description="Classes; taken from the dataset when left out."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout between a block's convs.")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        try:
            parse_name(value)
        except UnknownModelError as err:
            raise ValueError(str(err)) from None
        return value


class SynthSection(Section):
    """Synthetic JPEGs written on first run when the dataset folder is missing."""

    classes: int = Field(4, ge=2)
    per_class: int = Field(64, ge=2)
    size: int = Field(40, ge=8)
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0)


class DataSection(Section):
    dataset: Literal["imagefolder", "cifar10", "cifar100", "svhn"] = "cifar10"
    url: str = Field(
        ..., description="fsspec URL of the dataset root: a path, file://, or s3://bucket/prefix."
    )
    image_size: int | None = Field(
        None, ge=8, description="Training crop; 32 for CIFAR/SVHN, the model's default otherwise."
    )
    eval_resize: int | None = Field(
        None, ge=8, description="Resize before the centre crop at evaluation (imagefolder)."
    )
    batch_size: int = Field(128, ge=1, description="Global batch size across all workers.")
    augment: bool | None = Field(
        None, description="Training augmentation; off for SVHN, on otherwise, as in the paper."
    )
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per training worker.")
    synthesize: SynthSection | None = Field(
        None, description="Write synthetic JPEGs to url on first run (imagefolder only)."
    )

    _absolute_url = field_validator("url")(absolute_if_local)

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.dataset in ("cifar10", "cifar100"):
            return CIFAR_MEAN_STD
        if self.dataset == "svhn":
            return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return IMAGENET_MEAN_STD


class OptimizerSection(Section):
    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    decay_norm_and_bias: bool = Field(True, description="Apply weight decay to BN and biases.")
    scale_lr_with_batch: bool = Field(
        False, description="lr *= batch_size / base_batch_size (the linear scaling rule)."
    )
    base_batch_size: int = Field(128, ge=1)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")


class ScheduleSection(Section):
    epochs: int = Field(200, ge=1)
    type: Literal["multistep", "cosine"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [60, 120, 160])
    gamma: float = Field(0.2, gt=0.0, le=1.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(
        0, ge=0, description="Warmup in optimizer steps instead of epochs (detection recipes)."
    )

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError(f"milestones must increase strictly, got {value}")
        if any(m < 1 for m in value):
            raise ValueError(f"milestones are epochs >= 1, got {value}")
        return value


class PrecisionSection(Section):
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the device supports it, else fp32."
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto",
        description="auto: channels_last on CUDA and with native bf16 on the CPU, where it "
        "measured faster; NCHW otherwise (slower in fp32 on the CPU).",
    )
    compile: bool = False


class ScalingSection(Section):
    workers: int = Field(2, ge=1, description="Ray Train workers (DDP processes).")
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, ge=0.0)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers: SPREAD puts them on different nodes."
    )


class CheckpointSection(Section):
    storage: str | None = Field(
        None, description="fsspec URL for Ray Train storage; <home>/runs when left out."
    )
    every_epochs: int = Field(1, ge=1)
    keep: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts; -1 for unlimited.")
    upload_attempts: int = Field(
        6, ge=1, description="Tries to store a checkpoint before the job stops with an error."
    )
    upload_backoff_s: float = Field(
        5.0, ge=0, le=60, description="Wait after a failed upload; doubles, up to 60 s."
    )

    _absolute_storage = field_validator("storage")(absolute_if_local)

    def storage_url(self) -> str:
        return self.storage or str(home() / "runs")


class TrackingSection(Section):
    experiment: str = "wrn-cluster"
    registered_model: str | None = Field(None, description="Model Registry name; none: no model.")
    alias: str = "champion"
    promotion_metric: str = "val_top1"
    log_every_steps: int = Field(50, ge=1)
    enabled: bool = True


class JobBase(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", description="Job name.")
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    precision: PrecisionSection = Field(default_factory=PrecisionSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _schedule_fits_training(self) -> JobBase:
        epochs = self.schedule.epochs
        late = [m for m in self.schedule.milestones if m >= epochs]
        if self.schedule.type == "multistep" and late:
            raise _FieldError(
                "schedule.milestones",
                f"milestones {late} are not before the last epoch ({epochs}); "
                "use milestones below schedule.epochs",
            )
        if self.schedule.warmup_epochs and self.schedule.warmup_steps:
            if "warmup_steps" in self.schedule.model_fields_set:
                raise _FieldError(
                    "schedule.warmup_steps",
                    "give the warmup in epochs or in steps, not both; set one of them to 0",
                )
            self.schedule.warmup_steps = 0  # epochs the user wrote beat a recipe's default steps
        if self.schedule.warmup_epochs >= epochs:
            raise _FieldError(
                "schedule.warmup_epochs",
                f"warmup of {self.schedule.warmup_epochs} epochs is not shorter than training "
                f"({epochs} epochs)",
            )
        return self

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> JobBase:
        batch = self.data.batch_size  # type: ignore[attr-defined]  # each kind has its data
        micro = self.scaling.workers * self.optimizer.grad_accum_steps
        if batch % micro:
            raise _FieldError(
                "data.batch_size",
                f"{batch} does not split evenly over {self.scaling.workers} workers x "
                f"{self.optimizer.grad_accum_steps} accumulation steps; use a multiple of {micro}",
            )
        return self

    @property
    def per_worker_batch(self) -> int:
        micro = self.scaling.workers * self.optimizer.grad_accum_steps
        return self.data.batch_size // micro  # type: ignore[attr-defined]


class ClassifyData(DataSection):
    pass


class ClassifyJob(JobBase):
    kind: Literal["classify"]
    data: ClassifyData

    @model_validator(mode="after")
    def _data_fits_model(self) -> ClassifyJob:
        info = parse_name(self.model.arch)
        facts = DATASET_FACTS[self.data.dataset]
        fixed = facts.get("image_size")
        if fixed and self.data.image_size not in (None, fixed):
            raise _FieldError(
                "data.image_size",
                f"{self.data.dataset} images are {fixed}x{fixed}; got {self.data.image_size}, "
                f"set it to {fixed} or leave it out",
            )
        size = self.image_size
        if size < info.total_stride:
            raise _FieldError(
                "data.image_size",
                f"{size}px is smaller than {self.model.arch}'s total stride "
                f"({info.total_stride}); use at least {info.total_stride}",
            )
        if info.family != "cifar" and self.model.dropout:
            raise _FieldError(
                "model.dropout",
                f"dropout is defined for the CIFAR/SVHN family only, not {self.model.arch}; "
                "set it to 0",
            )
        if self.data.synthesize and self.data.dataset != "imagefolder":
            raise _FieldError(
                "data.synthesize", "synthetic data is written as an imagefolder; remove it"
            )
        return self

    @property
    def image_size(self) -> int:
        fixed = DATASET_FACTS[self.data.dataset].get("image_size")
        return self.data.image_size or fixed or parse_name(self.model.arch).default_image_size

    @property
    def augment(self) -> bool:
        if self.data.augment is not None:
            return self.data.augment
        return self.data.dataset != "svhn"


class DetectModel(Section):
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

    _known_arch = field_validator("arch")(ModelSection._known_arch.__func__)

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


class DetectData(Section):
    dataset: Literal["coco"] = "coco"
    url: str = Field(..., description="fsspec URL of a COCO root (images + annotations).")
    train_annotations: str = "annotations/instances_train2017.json"
    val_annotations: str = "annotations/instances_val2017.json"
    train_images: str = "train2017"
    val_images: str = "val2017"
    batch_size: int = Field(16, ge=1, description="Global batch size across all workers.")
    min_size: int = Field(800, ge=32, description="Shorter side the detector resizes to.")
    max_size: int = Field(1333, ge=32, description="Cap on the longer side after resizing.")
    flip: bool = Field(True, description="Horizontal flip (boxes move with it) in training.")
    keep_empty_images: bool = Field(
        False, description="Train on images without boxes too (torchvision drops them)."
    )
    group_aspect_ratio: bool = Field(
        True, description="Batch wide images with wide, tall with tall (less padding)."
    )
    loader_workers: int = Field(2, ge=0)
    synthesize: SynthCocoSection | None = Field(
        None, description="Write synthetic shapes in COCO format to url on first run."
    )

    _absolute_url = field_validator("url")(absolute_if_local)

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


class DetectJob(JobBase):
    kind: Literal["detect"]
    model: DetectModel = Field(default_factory=DetectModel)  # type: ignore[assignment]
    data: DetectData
    detector: DetectorSection = Field(default_factory=DetectorSection)
    optimizer: DetectOptimizer = Field(default_factory=DetectOptimizer)  # type: ignore[assignment]
    schedule: DetectSchedule = Field(default_factory=DetectSchedule)  # type: ignore[assignment]
    tracking: DetectTracking = Field(default_factory=DetectTracking)  # type: ignore[assignment]

    @model_validator(mode="after")
    def _detector_fits(self) -> DetectJob:
        info = parse_name(self.model.arch)
        if info.family == "cifar":
            raise _FieldError(
                "model.arch",
                f"{self.model.arch} is a CIFAR/SVHN network; detection backbones are the "
                "ImageNet WRNs: wrn-18-K, wrn-34-K, wrn-50-K, wrn-101-K (e.g. wrn-50-2)",
            )
        model = self.model
        if not model.backbone_weights and model.layers_trained < 5:
            raise _FieldError(
                "model.trainable_layers",
                "freezing backbone layers keeps their random initial weights; set "
                "model.backbone_weights or leave trainable_layers at 5",
            )
        if not model.backbone_weights and model.batchnorm_frozen:
            raise _FieldError(
                "model.frozen_bn",
                "a frozen BatchNorm of a backbone trained from scratch normalizes nothing; "
                "set model.backbone_weights or frozen_bn: false",
            )
        if self.data.min_size > self.data.max_size:
            raise _FieldError(
                "data.min_size",
                f"min_size {self.data.min_size} is above max_size {self.data.max_size}; "
                "lower min_size or raise max_size",
            )
        if self.precision.compile:
            raise _FieldError(
                "precision.compile",
                "torch.compile is not used for detection (dynamic shapes); set it to false",
            )
        if self.optimizer.label_smoothing:
            raise _FieldError(
                "optimizer.label_smoothing", "label smoothing is for classification; set it to 0"
            )
        return self


class SearchDim(Section):
    """One searched field: exactly one of grid, choice, uniform, loguniform, randint."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchDim:
        given = [k for k in SEARCH_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(SEARCH_KINDS)}; got {', '.join(given) or 'none'}"
            )
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"{given[0]} needs at least one value")
        if given[0] in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{given[0]} needs [low, high] with low < high, got {list(values)}")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {values[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SEARCH_KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> Any:
        return getattr(self, self.kind)


SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# Searched as parts of model.arch ("wrn-D-K"), so budgets can be checked before trials start.
ARCH_PARTS = ("model.depth", "model.width")


class BudgetSection(Section):
    max_params: int | None = Field(None, ge=1, description="Skip networks with more parameters.")
    max_gmacs: float | None = Field(None, gt=0, description="Skip networks costing more GMACs.")


class TuneSection(Section):
    space: dict[str, SearchDim] = Field(
        default_factory=lambda: {
            "model.depth": SearchDim(grid=[16, 22, 28]),
            "model.width": SearchDim(grid=[2, 4, 8]),
        },
        description="Spec field (dotted) -> search; model.depth and model.width build the arch.",
    )
    num_samples: int = Field(1, ge=1, description="Repeats of the grid (or random samples).")
    scheduler: Literal["asha", "fifo"] = "asha"
    metric: str = "val_top1"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before ASHA judges.")
    reduction_factor: int = Field(3, ge=2)
    max_concurrent_trials: int = Field(1, ge=1)
    max_failures: int = Field(1, ge=0, description="Retries of a failed trial.")
    budget: BudgetSection | None = None
    seed: int | None = Field(None, description="Seed of the random searches; the job's if unset.")

    @model_validator(mode="after")
    def _arch_parts_are_discrete(self) -> TuneSection:
        for key in ARCH_PARTS:
            if key in self.space and self.space[key].kind not in ("grid", "choice"):
                raise _FieldError(
                    f"tune.space.{key}", "depth and width are searched with grid or choice"
                )
        if "model.arch" in self.space and any(k in self.space for k in ARCH_PARTS):
            raise _FieldError(
                "tune.space.model.arch", "search model.arch or model.depth/width, not both"
            )
        return self


def _first_problem(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}"
    return f"no such field ({error})"


class TuneJob(ClassifyJob):
    """A search: the classify fields are the base every trial starts from."""

    kind: Literal["tune"]  # type: ignore[assignment]
    tune: TuneSection = Field(default_factory=TuneSection)

    @model_validator(mode="after")
    def _space_fits_the_base(self) -> TuneJob:
        """Every searched field exists, and every grid/choice value makes a valid trial."""
        from wrn_cluster.tune import arch_candidates, trial_spec

        for key, dim in self.tune.space.items():
            if key in ARCH_PARTS:
                continue
            samples = dim.values if dim.kind in ("grid", "choice") else [dim.values[0]]
            for value in samples:
                try:
                    trial_spec(self, {key: value}, "check")
                except (ValidationError, KeyError, TypeError) as error:
                    raise _FieldError(
                        f"tune.space.{key}",
                        f"{value!r} makes an invalid trial: {_first_problem(error)}",
                    ) from None
        for arch in arch_candidates(self):
            try:
                parse_name(arch)
            except UnknownModelError as error:
                raise _FieldError("tune.space", str(error)) from None
        return self


JobSpec = Annotated[ClassifyJob | DetectJob | TuneJob, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[ClassifyJob | DetectJob | TuneJob] = TypeAdapter(JobSpec)
KINDS = ("classify", "detect", "tune")


class _FieldError(ValueError):
    """A cross-field rule that names the field it is about (not the model it runs in)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# ---------------------------------------------------------------------------------------------
# Loading, with errors that point at the file and line


@dataclass(frozen=True)
class Problem:
    source: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class SpecError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


_SECRET_KEY = re.compile(
    r"(secret|password|passwd|token|access[_-]?key|credential|api[_-]?key)", re.I
)
_SECRET_VALUE = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s:]+:[^/@\s]+@"), "a URL with a password in it"),
]


def _secret_problems(tree: Any, path: tuple, source: str, lines: dict) -> list[Problem]:
    problems: list[Problem] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            sub = (*path, key)
            if isinstance(key, str) and _SECRET_KEY.search(key):
                problems.append(
                    Problem(
                        source,
                        _line_of(lines, sub),
                        _dotted(sub),
                        "credentials never live in a spec; remove this key and set them in the "
                        "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                        "MLFLOW_TRACKING_TOKEN) or the cluster's secrets",
                    )
                )
            else:
                problems += _secret_problems(value, sub, source, lines)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            problems += _secret_problems(value, (*path, i), source, lines)
    elif isinstance(tree, str):
        for pattern, what in _SECRET_VALUE:
            if pattern.search(tree):
                problems.append(
                    Problem(
                        source,
                        _line_of(lines, path),
                        _dotted(path),
                        f"this value looks like {what}; credentials never live in a spec: "
                        "set them in the environment or the cluster's secrets",
                    )
                )
    return problems


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _node_lines(node: yaml.Node, path: tuple, out: dict) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*path, key)] = key_node.start_mark.line + 1
            _node_lines(value_node, (*path, key), out)
            out[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, (*path, i), out)


# A job spec is a few hundred values; aliases of aliases can expand a small file to billions.
MAX_VALUES = 10_000


class _CyclicAlias(Exception):
    pass


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_nodes: set[int]) -> int:
    """Values the YAML holds once its aliases are expanded; raises _CyclicAlias for an alias
    inside its own anchor. Linear in the document, however much it would expand."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_nodes:
        raise _CyclicAlias
    open_nodes.add(key)
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    size = 1 + sum(_expanded_size(child, memo, open_nodes) for child in children)
    open_nodes.discard(key)
    memo[key] = min(size, MAX_VALUES + 1)
    return memo[key]


def _size_problem(node: yaml.Node, source: str) -> Problem | None:
    try:
        size = _expanded_size(node, {}, set())
    except _CyclicAlias:
        return Problem(source, None, "", "a YAML alias refers to its own anchor; remove the cycle")
    if size > MAX_VALUES:
        return Problem(
            source,
            None,
            "",
            f"the YAML expands to more than {MAX_VALUES} values (aliases of aliases); "
            "write the spec out without nested aliases",
        )
    return None


def _line_of(lines: dict, path: tuple) -> int | None:
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path)


def _known_fields(path: tuple, kind: str | None) -> list[str]:
    """Field names of the section at ``path``, for 'did you mean' suggestions."""
    cls: Any = {"classify": ClassifyJob, "detect": DetectJob, "tune": TuneJob}.get(kind or "")
    if cls is None:
        return ["kind"]
    for part in path:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        cls = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if cls is None:
            return []
    return list(cls.model_fields)


def _describe_error(error: dict, kind: str | None) -> tuple[tuple, str]:
    loc = tuple(error["loc"])
    if loc and loc[0] in KINDS:
        loc = loc[1:]
    kind_of_error = error["type"]
    value = error.get("input")
    if kind_of_error == "extra_forbidden":
        known = _known_fields(loc[:-1], kind)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(known)}"
        return loc, f"unknown key {loc[-1]!r}; {hint}"
    if kind_of_error == "missing":
        return loc, "required, but missing; add it"
    if kind_of_error in ("union_tag_invalid", "union_tag_not_found"):
        return (
            ("kind",),
            f"got {value.get('kind') if isinstance(value, dict) else value!r}; "
            f"kind must be one of {', '.join(KINDS)}",
        )
    if kind_of_error == "value_error":
        ctx_error = error.get("ctx", {}).get("error")
        if isinstance(ctx_error, _FieldError):
            return tuple(ctx_error.field.split(".")), ctx_error.message
        message = str(ctx_error) if ctx_error else error["msg"]
        return loc, f"{message} (got {value!r})" if not isinstance(value, dict) else message
    shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
    message = error["msg"].rstrip(".")
    # Lower-case the first letter only: the rest may quote a pattern or a value.
    return loc, f"{message[:1].lower()}{message[1:]}{shown}"


def _set_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise SpecError(
            [Problem("--set", None, assignment, "expected KEY=VALUE, e.g. optimizer.lr=0.05")]
        )
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise SpecError([Problem("--set", None, key, f"{prefix} is not a section")])
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def parse(
    text: str, source: str = "<spec>", overrides: list[str] | tuple[str, ...] = ()
) -> ClassifyJob | DetectJob | TuneJob:
    """Validate YAML text (plus ``--set`` overrides); raise SpecError listing every problem."""
    try:
        node = yaml.compose(text)
        too_big = _size_problem(node, source) if node is not None else None
        if too_big:
            raise SpecError([too_big])
        tree = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown place"
        raise SpecError(
            [
                Problem(
                    source,
                    mark.line + 1 if mark else None,
                    "",
                    f"YAML syntax error at {where}: "
                    f"{err.problem}; fix the indentation or quoting there",
                )
            ]
        ) from None
    except yaml.YAMLError as err:  # the reader's: control characters YAML does not allow
        first = (str(err).strip().splitlines() or ["unreadable"])[0]
        raise SpecError(
            [Problem(source, None, "", f"not YAML text ({first}); remove that character")]
        ) from None
    except RecursionError:
        raise SpecError(
            [Problem(source, None, "", "nested too deeply for a job spec; flatten it")]
        ) from None
    if not isinstance(tree, dict):
        raise SpecError(
            [Problem(source, 1, "", "a job spec is a YAML mapping with at least kind, name, data")]
        )
    lines: dict = {}
    if node is not None:
        _node_lines(node, (), lines)
    for assignment in overrides:
        _set_override(tree, assignment)
    problems = _secret_problems(tree, (), source, lines)
    if problems:
        raise SpecError(problems)
    kind = tree.get("kind") if isinstance(tree.get("kind"), str) else None
    try:
        return _ADAPTER.validate_python(tree)
    except ValidationError as err:
        overridden = {tuple(a.split("=", 1)[0].strip().split(".")) for a in overrides}
        seen = set()
        for error in err.errors(include_url=False):
            loc, message = _describe_error(error, kind)
            where = "--set" if any(loc[: len(o)] == o for o in overridden) else source
            problem = Problem(
                where, None if where == "--set" else _line_of(lines, loc), _dotted(loc), message
            )
            if str(problem) not in {str(p) for p in seen}:
                seen.add(problem)
        raise SpecError(sorted(seen, key=lambda p: (p.line or 0, p.field))) from None


def load(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> ClassifyJob | DetectJob | TuneJob:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError([Problem(str(path), None, "", "no such file; check the path")]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise SpecError([Problem(str(path), None, "", f"cannot read the spec: {err}")]) from None
    return parse(text, str(path), overrides)


def json_schema() -> dict:
    schema = _ADAPTER.json_schema()
    schema["title"] = "wrn-cluster job spec"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def to_yaml(spec: BaseModel) -> str:
    return yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False)


def flatten(spec: BaseModel) -> dict[str, Any]:
    """The spec as dotted keys, e.g. {"optimizer.lr": 0.1}, for tracking params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", json.loads(spec.model_dump_json()))
    return out
