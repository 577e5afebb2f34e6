"""``kind: tune``: a width/depth search whose trials are classify jobs built from its base.

What a trial is (``trial_spec``) and which networks a space builds (``arch_candidates``) are
pure spec logic, here, so a search is validated before any trial starts; ``wrn_cluster.tune``
runs the trials.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from wrn_cluster.spec.classify import ClassifyJob
from wrn_cluster.spec.names import UnknownModelError, arch_name, parse_name
from wrn_cluster.spec.sections import FieldError, Section

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# Searched as parts of model.arch ("wrn-D-K"), so budgets can be checked before trials start.
ARCH_PARTS = ("model.depth", "model.width")


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
                raise FieldError(
                    f"tune.space.{key}", "depth and width are searched with grid or choice"
                )
        if "model.arch" in self.space and any(k in self.space for k in ARCH_PARTS):
            raise FieldError(
                "tune.space.model.arch", "search model.arch or model.depth/width, not both"
            )
        return self


class TuneJob(ClassifyJob):
    """A search: the classify fields are the base every trial starts from."""

    # A search is a classify job (every caller of one takes it), told apart only by this tag.
    kind: Literal["tune"]  # type: ignore[assignment]
    tune: TuneSection = Field(default_factory=TuneSection)

    @model_validator(mode="after")
    def _space_fits_the_base(self) -> TuneJob:
        """Every searched field exists, and every grid/choice value makes a valid trial."""
        if self.checkpoint.every_steps:
            raise FieldError(
                "checkpoint.every_steps",
                f"{self.checkpoint.every_steps}: a search checkpoints its trials at the end of an "
                "epoch (ASHA counts each report as an epoch); remove checkpoint.every_steps",
            )
        for key, dim in self.tune.space.items():
            if key in ARCH_PARTS:
                continue
            samples = dim.values if dim.kind in ("grid", "choice") else [dim.values[0]]
            for value in samples:
                try:
                    trial_spec(self, {key: value}, "check")
                except (ValidationError, KeyError, TypeError) as error:
                    raise FieldError(
                        f"tune.space.{key}",
                        f"{value!r} makes an invalid trial: {_first_problem(error)}",
                    ) from None
        for arch in arch_candidates(self):
            try:
                parse_name(arch)
            except UnknownModelError as error:
                raise FieldError("tune.space", str(error)) from None
        return self


def _first_problem(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}"
    return f"no such field ({error})"


def arch_parts(arch: str) -> tuple[int, float]:
    """(depth, width) of a paper name: ``arch_parts("wrn-28-10") == (28, 10.0)``."""
    info = parse_name(arch)
    return info.depth, info.width


def arch_candidates(spec: TuneJob) -> list[str]:
    """The networks the space can build: model.arch's values, or depth x width."""
    space = spec.tune.space
    if "model.arch" in space and space["model.arch"].kind in ("grid", "choice"):
        return list(space["model.arch"].values)
    if not any(key in space for key in ARCH_PARTS):
        return [spec.model.arch]
    base = arch_parts(spec.model.arch)
    depths = space["model.depth"].values if "model.depth" in space else [base[0]]
    widths = space["model.width"].values if "model.width" in space else [base[1]]
    return [arch_name(d, w) for d, w in itertools.product(depths, widths)]


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]  # KeyError: not a section of the spec
        if not isinstance(node, dict):
            raise TypeError(f"{part} is not a section")
    node[leaf] = value


def trial_spec(spec: TuneJob, config: dict[str, Any], name: str) -> ClassifyJob:
    """The classify job of one trial: the base with the trial's values set."""
    tree = spec.model_dump(mode="json")
    tree.pop("tune")
    tree.update(kind="classify", name=name)
    # The sweep registers its best trial; trials only log their models to their runs.
    tree["tracking"]["registered_model"] = None
    for key, value in config.items():
        if key not in ARCH_PARTS:
            _set(tree, key, value)
    return ClassifyJob.model_validate(tree)
