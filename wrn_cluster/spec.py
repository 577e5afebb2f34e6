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
    whose working directory is not the user's."""
    if url is None or "://" in url:
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
    channels_last: bool = True
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
        if self.schedule.warmup_epochs >= epochs:
            raise _FieldError(
                "schedule.warmup_epochs",
                f"warmup of {self.schedule.warmup_epochs} epochs is not shorter than training "
                f"({epochs} epochs)",
            )
        return self


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
        micro = self.scaling.workers * self.optimizer.grad_accum_steps
        if self.data.batch_size % micro:
            raise _FieldError(
                "data.batch_size",
                f"{self.data.batch_size} does not split evenly over {self.scaling.workers} "
                f"workers x {self.optimizer.grad_accum_steps} accumulation steps; use a multiple "
                f"of {micro}",
            )
        return self

    @property
    def image_size(self) -> int:
        fixed = DATASET_FACTS[self.data.dataset].get("image_size")
        return self.data.image_size or fixed or parse_name(self.model.arch).default_image_size

    @property
    def per_worker_batch(self) -> int:
        return self.data.batch_size // (self.scaling.workers * self.optimizer.grad_accum_steps)

    @property
    def augment(self) -> bool:
        if self.data.augment is not None:
            return self.data.augment
        return self.data.dataset != "svhn"


class DetectData(Section):
    dataset: Literal["coco"] = "coco"
    url: str = Field(..., description="fsspec URL of a COCO root (images + annotations).")
    train_annotations: str = "annotations/instances_train2017.json"
    val_annotations: str = "annotations/instances_val2017.json"
    train_images: str = "train2017"
    val_images: str = "val2017"
    batch_size: int = Field(16, ge=1)
    min_size: int = Field(800, ge=32)
    max_size: int = Field(1333, ge=32)
    loader_workers: int = Field(2, ge=0)

    _absolute_url = field_validator("url")(absolute_if_local)


class DetectJob(JobBase):
    kind: Literal["detect"]
    data: DetectData
    detector: Literal["fasterrcnn_fpn"] = "fasterrcnn_fpn"


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
    return loc, f"{error['msg'].rstrip('.').lower()}{shown}"


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
