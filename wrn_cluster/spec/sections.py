"""The sections every job kind shares, and ``JobBase``, the fields and rules common to all kinds.

Each kind (classify, detect, tune) fills ``JobBase``'s type parameters with its own model, data
and recipe sections, so the detection recipe's defaults differ without overriding a field's type.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Generic, Literal, Protocol, TypeVar
from urllib.parse import unquote

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from wrn_cluster.spec.datasets import DATASET_FACTS, MeanStd
from wrn_cluster.spec.names import UnknownModelError, parse_name


def lower_is_better(metric: str) -> bool:
    """A loss (its EMA's too) is better lower; every other metric higher."""
    return metric.removesuffix("_ema").endswith("loss")


def home() -> Path:
    """Where the embedded defaults keep files: ``WRN_CLUSTER_HOME`` or ``./.wrn-cluster``."""
    return Path(os.environ.get("WRN_CLUSTER_HOME", ".wrn-cluster")).absolute()


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FieldError(ValueError):
    """A cross-field rule that names the field it is about (not the model it runs in)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # pickled whole (Ray sends errors)
        return (type(self), (self.field, self.message))


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


class ArchSection(Section):
    """A model section: every kind names its network by the paper's name."""

    arch: str

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        try:
            parse_name(value)
        except UnknownModelError as err:
            raise ValueError(str(err)) from None
        return value


class ModelSection(ArchSection):
    arch: str = Field("wrn-28-10", description="Paper name, e.g. wrn-28-10, wrn-50-2.")
    num_classes: int | None = Field(
        None, ge=2, description="Classes; taken from the dataset when left out."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout between a block's convs.")


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

    def mean_std(self) -> MeanStd:
        return DATASET_FACTS[self.dataset].mean_std


class ShardedData(Section):
    """How a dataset is read: as its own files, or packed into shards (`wrn-cluster data
    pack`) that each node streams into a bounded cache. Classification and detection share it."""

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
    canonical_nodes: int = Field(
        8,
        ge=1,
        description="Streaming's canonical node count: with the seed it fixes the shards' "
        "sample order; keep it for the life of a job.",
    )

    _absolute_cache = field_validator("shard_cache")(absolute_if_local)

    @field_validator("shard_cache_limit")
    @classmethod
    def _a_size(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+(\.\d+)?\s*[kmgt]?b", value.lower()):
            raise ValueError(f"{value!r} is not a size; write it like 500mb, 200gb or 2tb")
        return value  # data.shards.size_in_bytes reads it as Streaming does


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
    stop_at: dict[str, float] | None = Field(
        None,
        description="End the job at the first epoch whose metric reaches the value, e.g. "
        "{val_top1: 0.785} (a *loss: at or below it); the time and device-hours to it are "
        "recorded as time_to_<metric>_<value> and device_hours_to_<metric>_<value>.",
    )

    def target_keys(self) -> tuple[str, str] | None:
        """The metric names a reached ``stop_at`` is recorded under: (seconds of job wall
        time, device-hours), e.g. time_to_val_top1_0.785, device_hours_to_val_top1_0.785."""
        if not self.stop_at:
            return None
        ((metric, value),) = self.stop_at.items()
        target = f"{metric}_{value:g}"
        return f"time_to_{target}", f"device_hours_to_{target}"

    @field_validator("stop_at")
    @classmethod
    def _one_target(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and len(value) != 1:
            raise ValueError(
                f"give one metric and its value, e.g. {{val_top1: 0.785}}; got {len(value)}"
            )
        return value

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


class WorkerRange(Section):
    """An elastic worker group: Ray Train starts with what the cluster has (at least ``min``),
    grows towards ``max`` as nodes join and shrinks, rather than stopping, when nodes leave."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> WorkerRange:
        if self.min > self.max:
            raise FieldError(
                "scaling.workers.max", f"{self.max} is below min {self.min}; set max >= min"
            )
        return self


def _workers_kind(value: object) -> str:
    return "range" if isinstance(value, dict | WorkerRange) else "count"


# A number or a range; the tag keeps a bad range from also being reported as a bad number.
Workers = Annotated[
    Annotated[int, Tag("count")] | Annotated[WorkerRange, Tag("range")],
    Discriminator(_workers_kind),
]


class ScalingSection(Section):
    workers: Workers = Field(
        2,
        description="Ray Train workers (DDP processes): a number, or {min, max} for an elastic "
        "group that shrinks and grows with the cluster.",
    )
    resize_check_s: float = Field(
        60.0,
        gt=0.0,
        description="How often an elastic group looks for room to grow (Ray Train's "
        "elastic_resize_monitor_interval_s); growing restarts it from the last checkpoint.",
    )
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, ge=0.0)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers: SPREAD puts them on different nodes."
    )

    @field_validator("workers")
    @classmethod
    def _at_least_one(cls, workers: int | WorkerRange) -> int | WorkerRange:
        if isinstance(workers, int) and workers < 1:
            raise ValueError(f"{workers} workers; use 1 or more, or {{min: 1, max: N}}")
        return workers

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, WorkerRange)

    @property
    def min_workers(self) -> int:
        return self.workers.min if isinstance(self.workers, WorkerRange) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers.max if isinstance(self.workers, WorkerRange) else self.workers

    def describe(self) -> str:
        """'2', or '1-4 (elastic)'."""
        if isinstance(self.workers, WorkerRange):
            return f"{self.workers.min}-{self.workers.max} (elastic)"
        return str(self.workers)


class CheckpointSection(Section):
    storage: str | None = Field(
        None, description="fsspec URL for Ray Train storage; <home>/runs when left out."
    )
    every_epochs: int = Field(1, ge=1)
    every_steps: int | None = Field(
        None,
        ge=1,
        description="Also checkpoint every N optimizer steps inside an epoch; a resume continues "
        "with the epoch's next sample.",
    )
    keep: int = Field(2, ge=1, description="The newest N checkpoints stay; older ones go.")
    keep_best: int = Field(
        1,
        ge=0,
        description="Also keep the N best checkpoints by tracking.promotion_metric (epoch "
        "checkpoints, which are evaluated). A checkpoint a registered model version was made "
        "from stays while that version exists.",
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts; -1 for unlimited.")
    max_preemptions: int = Field(
        -1,
        ge=-1,
        description="Restarts after a node is preempted (drained), apart from max_failures; "
        "-1 for unlimited (Ray Train's max_preemption_failures).",
    )
    preemption_check_steps: int = Field(
        10,
        ge=1,
        description="Ask Ray Train every N steps whether a node is being drained; on a notice "
        "every worker checkpoints at once (just in time, before the deadline).",
    )
    upload: Literal["async", "sync"] = Field(
        "async",
        description="async: training goes on while a checkpoint uploads (Ray Train's ASYNC "
        "mode, one upload at a time; a step checkpoint due while one is uploading is skipped); "
        "sync: every worker waits for the upload.",
    )
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
    progress_every_s: float = Field(
        30.0,
        ge=0,
        description="Seconds between rank 0's progress lines inside an epoch (step, loss, "
        "img/s, ETA of the epoch and the job); 0 prints only the epoch lines.",
    )
    max_device_hours: float | None = Field(
        None,
        gt=0.0,
        description="Promote a version only if it reached schedule.stop_at within this many "
        "device-hours (wall time x GPUs, or x CPU workers without GPUs).",
    )
    enabled: bool = True


class BatchedData(Protocol):
    """What the shared rules read from any kind's data section."""

    batch_size: int


ModelT = TypeVar("ModelT", bound=ArchSection)
DataT = TypeVar("DataT", bound=BatchedData)
OptimizerT = TypeVar("OptimizerT", bound=OptimizerSection)
ScheduleT = TypeVar("ScheduleT", bound=ScheduleSection)
TrackingT = TypeVar("TrackingT", bound=TrackingSection)


class JobBase(Section, Generic[ModelT, DataT, OptimizerT, ScheduleT, TrackingT]):
    """Fields and rules of every kind; a kind gives the sections' types and their defaults."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", description="Job name.")
    seed: int = 0
    model: ModelT
    optimizer: OptimizerT
    schedule: ScheduleT
    precision: PrecisionSection = Field(default_factory=PrecisionSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingT
    if TYPE_CHECKING:
        # Declared by each kind after its kind tag, where it has always been in dumps.
        data: DataT

    @model_validator(mode="after")
    def _schedule_fits_training(self) -> JobBase:
        epochs = self.schedule.epochs
        late = [m for m in self.schedule.milestones if m >= epochs]
        if self.schedule.type == "multistep" and late:
            raise FieldError(
                "schedule.milestones",
                f"milestones {late} are not before the last epoch ({epochs}); "
                "use milestones below schedule.epochs",
            )
        if self.schedule.warmup_epochs and self.schedule.warmup_steps:
            if "warmup_steps" in self.schedule.model_fields_set:
                raise FieldError(
                    "schedule.warmup_steps",
                    "give the warmup in epochs or in steps, not both; set one of them to 0",
                )
            self.schedule.warmup_steps = 0  # epochs the user wrote beat a recipe's default steps
        if self.tracking.max_device_hours is not None and not self.schedule.stop_at:
            raise FieldError(
                "tracking.max_device_hours",
                "a budget to reach a target needs the target; set schedule.stop_at, e.g. "
                "{val_top1: 0.785}, or remove max_device_hours",
            )
        if self.schedule.stop_at:
            (metric,) = self.schedule.stop_at
            known = self.evaluation_metrics()
            if metric not in known:
                raise FieldError(
                    "schedule.stop_at",
                    f"{metric!r} is not a metric this job evaluates; use one of {', '.join(known)}",
                )
            value = self.schedule.stop_at[metric]
            fraction = metric.startswith(("val_top", "AP"))
            if fraction and not 0 < value <= 1:
                raise FieldError(
                    "schedule.stop_at",
                    f"{metric} is a fraction from 0 to 1; {value:g} reads as a percentage, "
                    f"write {value / 100:g}"
                    if value > 1
                    else f"{metric} {value:g} is "
                    "reached before training; give a value above 0, up to 1",
                )
        if self.schedule.warmup_epochs >= epochs:
            raise FieldError(
                "schedule.warmup_epochs",
                f"warmup of {self.schedule.warmup_epochs} epochs is not shorter than training "
                f"({epochs} epochs)",
            )
        return self

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> JobBase:
        batch, accum, scaling = self.data.batch_size, self.optimizer.grad_accum_steps, self.scaling
        if not scaling.elastic:
            micro = scaling.max_workers * accum
            if batch % micro:
                raise FieldError(
                    "data.batch_size",
                    f"{batch} does not split evenly over {scaling.workers} workers x "
                    f"{accum} accumulation steps; use a multiple of {micro}",
                )
            return self
        if batch % accum or batch // accum < scaling.max_workers:
            raise FieldError(
                "data.batch_size",
                f"{batch} does not give each of up to {scaling.max_workers} workers a share of "
                f"{accum} equal micro-batches; use a multiple of {accum} of at least "
                f"{accum * scaling.max_workers}",
            )
        if not self.uneven_shares:
            sizes = range(scaling.min_workers, scaling.max_workers + 1)
            uneven = [w for w in sizes if (batch // accum) % w]
            if uneven:
                need = math.lcm(*sizes) * accum
                raise FieldError(
                    "data.batch_size",
                    f"{batch} does not split evenly over {uneven[0]} workers x {accum} "
                    f"accumulation steps, a size the elastic range "
                    f"{scaling.min_workers}-{scaling.max_workers} can take, and this reader "
                    f"needs equal shares; use a multiple of {need}, or a narrower range",
                )
        return self

    def evaluation_metrics(self) -> list[str]:
        """The metrics each epoch's evaluation reports (what schedule.stop_at may name)."""
        return []

    def ships_average(self, metrics: dict[str, float]) -> bool:
        """Whether the weights' moving average (ema), not the raw weights, is the model a
        job with these final ``metrics`` logs and registers: it scored better by
        tracking.promotion_metric (its ``<metric>_ema``)."""
        metric = self.tracking.promotion_metric
        if metric.endswith("_ema"):  # promoted by the average's score: the average ships
            return isinstance(metrics.get(metric), int | float)
        raw, averaged = metrics.get(metric), metrics.get(f"{metric}_ema")
        if not isinstance(averaged, int | float):
            return False
        if not isinstance(raw, int | float):
            return True
        return averaged < raw if lower_is_better(metric) else averaged > raw

    @property
    def uneven_shares(self) -> bool:
        """Whether ranks may take unequal shares of a batch (the loss weighs each by its size):
        the file readers can; packed shards and aspect-ratio groups split evenly."""
        return False

    def global_micro_batch(self) -> int:
        """Samples of one micro-batch over all workers: the global batch / accumulation."""
        return self.data.batch_size // self.optimizer.grad_accum_steps

    def worker_batch(self, world: int) -> int:
        """The most samples one of ``world`` ranks takes from a micro-batch."""
        return -(-self.global_micro_batch() // world)

    @property
    def per_worker_batch(self) -> int:
        """A fixed group's per-rank micro-batch (an elastic one's is ``worker_batch(world)``)."""
        return self.worker_batch(self.scaling.max_workers)
