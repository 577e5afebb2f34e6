"""The Model Registry: a job's logged model registered once training is over, and the alias
moved to it only when its promotion metric beats the version that holds the alias now."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from wrn_cluster.spec import JobBase, lower_is_better
from wrn_cluster.tracking.context import JOB_TAG, RECIPE_TAG, RunContext
from wrn_cluster.tracking.server import client_for, display_uri, fluent_store, scrub

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel

T = TypeVar("T")


class RegistrationError(Exception):
    """Training finished but its model is not registered; the message names the model, the run
    that holds it and what to do."""


# MLflow error codes another attempt cannot change: give up at once instead of waiting.
_FINAL_ERRORS = {
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "NOT_FOUND",
    "BAD_REQUEST",
    "INVALID_STATE",
}


# On a run: the checkpoint its logged model was made from, so a resubmitted finished job
# (whose last checkpoint is the same) does not log and register the same network again.
MODEL_SOURCE_TAG = "wrn_cluster.model_checkpoint"
# On a model version: the checkpoint its weights came from, which retention never deletes.
CHECKPOINT_TAG = "checkpoint"
# A run's metrics that say when it reached schedule.stop_at: time_to_<target> (seconds of
# wall time) and device_hours_to_<target>.
TARGET_PREFIXES = ("time_to_", "device_hours_to_")


def registered_sources(tracking_uri: str, name: str) -> set[str]:
    """The checkpoints the versions of registered model ``name`` were made from (their runs'
    MODEL_SOURCE_TAG); empty when the model has no versions yet."""
    client = client_for(tracking_uri)
    sources = set()
    for version in client.search_model_versions(f"name = '{name}'"):
        source = version.tags.get(CHECKPOINT_TAG)
        if not source and version.run_id:  # registered before versions named it
            source = client.get_run(version.run_id).data.tags.get(MODEL_SOURCE_TAG)
        if source:
            sources.add(source.rstrip("/"))
    return sources


def log_trained_model(
    spec: JobBase,
    context: RunContext,
    run_id: str,
    source: str,
    log: Callable[[MlflowClient, str], Any],
    wait_s: float = 180.0,
) -> bool:
    """Log a finished run's network, read from checkpoint ``source``, to run ``run_id`` from
    the driver: ``log(client, run_id)`` is models.log_classifier or log_detector with the
    network bound. False when the run holds that checkpoint's model already. A server that is
    down is waited out for ``wait_s``; a refusal, or an outage past it, raises
    RegistrationError."""
    client = client_for(context.tracking_uri)
    deadline = time.monotonic() + wait_s

    def attempt() -> bool:
        run = client.get_run(run_id)
        logged = newest_ready_model(client, run.info.experiment_id, run)
        if logged and run.data.tags.get(MODEL_SOURCE_TAG) == source:
            return False
        log(client, run_id)
        client.set_tag(run_id, MODEL_SOURCE_TAG, source)
        return True

    with fluent_store(context.tracking_uri):  # log_model writes through the fluent API
        return retrying(
            deadline,
            attempt,
            lambda error: RegistrationError(
                f"job {spec.name!r} trained, but logging its model to MLflow run {run_id} "
                f"({display_uri()}) failed: {scrub(str(getattr(error, 'message', error)))}; "
                "the weights are in the job's checkpoints; submit the job again once the "
                "server answers (it resumes at its end and logs the model)"
            ),
        )


def register_job(
    spec: JobBase,
    context: RunContext,
    metrics: dict[str, Any] | None,
    run_id: str | None = None,
    wait_s: float = 180.0,
) -> str | None:
    """Register the model a classification or detection job's run logged, once training is
    over (the driver calls it, with the last epoch's ``metrics`` from Ray Train; the run's own
    are used when no epoch ran); returns the version. The run is ``run_id``, else the job's
    newest. Raises RegistrationError."""

    name = spec.tracking.registered_model
    if not name:
        return None
    client = client_for(context.tracking_uri)

    def find():
        experiment = client.get_experiment_by_name(spec.tracking.experiment)
        if run_id:
            runs = [client.get_run(run_id)]
        else:
            runs = experiment and client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`{JOB_TAG}` = '{spec.name}'",
                max_results=1,
                order_by=["attributes.start_time DESC"],
            )
        if not runs:
            return None, None
        return runs[0], newest_ready_model(client, runs[0].info.experiment_id, runs[0])

    deadline = time.monotonic() + wait_s
    run, model = retrying(deadline, find, lambda e: registration_error(spec, None, e))
    if run is None:
        raise RegistrationError(
            f"job {spec.name!r} trained, but MLflow ({display_uri()}) has no run of it in "
            f"experiment {spec.tracking.experiment!r} to register {name!r} from; the weights "
            "are in the job's checkpoints"
        )
    if model is None:
        raise RegistrationError(
            f"job {spec.name!r} trained, but its MLflow run {run.info.run_id} holds no logged "
            f"model to register as {name!r}; the weights are in the job's checkpoints"
        )
    facts = {
        key.removeprefix("model."): value
        for key, value in run.data.params.items()
        if key in ("model.params", "model.gmacs")
    }
    metrics = {k: v for k, v in (metrics or run.data.metrics).items() if isinstance(v, int | float)}
    return retrying(
        deadline,
        lambda: register(client, spec, model, metrics, facts, run.info.run_id),
        lambda error: registration_error(spec, model, error),
    )


def newest_ready_model(client: MlflowClient, experiment_id: str, run: Any) -> LoggedModel | None:
    """The run's newest logged model whose upload completed (a failed log_model leaves one
    FAILED or PENDING behind), else None."""
    from mlflow.entities import LoggedModelStatus

    logged = client.search_logged_models(
        [experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    return next((m for m in logged if m.status == LoggedModelStatus.READY), None)


def retrying(
    deadline: float, attempt: Callable[[], T], failure: Callable[[Exception], Exception]
) -> T:
    """attempt() until it succeeds; a final MLflow error, or any past the deadline, is raised
    as ``failure(error)``."""
    from mlflow.exceptions import MlflowException

    while True:
        try:
            return attempt()
        except (MlflowException, OSError) as error:  # the server's or the store's, not ours
            final = isinstance(error, MlflowException) and error.error_code in _FINAL_ERRORS
            if final or time.monotonic() > deadline:
                raise failure(error) from None
            time.sleep(5)


def registration_error(
    spec: JobBase, model: LoggedModel | None, error: Exception
) -> RegistrationError:
    """What failed, in the server's words, where the model stays and how to register it."""
    text = str(getattr(error, "message", error))
    body = re.search(r"Response body: '([^']*)'", text)  # an HTTP error's plain-text answer
    reason = scrub(" ".join((body.group(1) if body else text).split())).rstrip(".")
    code = getattr(error, "error_code", None)
    if code and code != "INTERNAL_ERROR":
        reason = f"{reason} ({code})"
    name = spec.tracking.registered_model
    if model is None:
        where = "the job's MLflow run keeps its metrics, and the weights are in its checkpoints"
        hint = "submit the job again once the server answers"
    else:
        where = (
            f"the model stays logged as {model.model_uri} in MLflow run {model.source_run_id}, "
            "and the weights are in the job's checkpoints"
        )
        hint = (
            f"register it once that is fixed: MLFLOW_TRACKING_URI={display_uri()} python -c "
            f"\"import mlflow; mlflow.register_model('{model.model_uri}', '{name}')\""
        )
    return RegistrationError(
        f"job {spec.name!r} trained, but registering its model as {name!r} in MLflow "
        f"({display_uri()}) failed: {reason}; {where}; {hint}"
    )


def register(
    client: MlflowClient,
    spec: JobBase,
    model: LoggedModel,
    metrics: dict[str, float],
    facts: dict[str, Any],
    run_id: str,
) -> str:
    """Register ``model`` (see _register) with the fluent URI on the client's store meanwhile."""
    with fluent_store(client.tracking_uri):
        return _register(client, spec, model, metrics, facts, run_id)


def _register(
    client: MlflowClient,
    spec: JobBase,
    model: LoggedModel,
    metrics: dict[str, float],
    facts: dict[str, Any],
    run_id: str,
) -> str:
    """A new version of tracking.registered_model from a logged model, tagged with its run's
    recipe and time to target; the alias moves to it only if its promotion metric beats the
    version that holds the alias now and, with tracking.max_device_hours, its run reached
    schedule.stop_at within that budget. The decision is logged on the version and on run
    ``run_id`` (the job's run, or a search's parent run)."""
    from mlflow.exceptions import MlflowException

    name = spec.tracking.registered_model
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # A retried registration must not make a second version of the same logged model.
    found = [
        v
        for v in client.search_model_versions(
            f"name = '{name}' and run_id = '{model.source_run_id}'"
        )
        if v.source == model.model_uri
    ]
    version = (
        found[0].version
        if found
        else client.create_model_version(
            name, model.model_uri, run_id=model.source_run_id, model_id=model.model_id
        ).version
    )
    # The trained run's own record: the last report passed in may predate its target.
    trained = client.get_run(model.source_run_id).data
    source, recipe = trained.tags.get(MODEL_SOURCE_TAG), trained.tags.get(RECIPE_TAG)
    tags = {
        **({CHECKPOINT_TAG: source} if source else {}),
        "dataset": spec.data.dataset,
        "job_name": spec.name,
        "arch": facts.get("arch", spec.model.arch),
        **facts,
        **({"recipe": recipe} if recipe else {}),
        # Evaluation metrics: classification's val_*, detection's COCO AP*.
        **{k: round(v, 6) for k, v in metrics.items() if k.startswith(("val_", "AP"))},
        **{k: round(v, 6) for k, v in trained.metrics.items() if k.startswith(TARGET_PREFIXES)},
    }
    alias, metric = spec.tracking.alias, spec.tracking.promotion_metric
    new = metrics.get(metric)
    if spec.ships_average(metrics):  # the logged model is the weights' moving average
        if not metric.endswith("_ema"):
            new = metrics[f"{metric}_ema"]
        # Its scores are the average's; the raw weights' stay beside them as *_raw.
        for key in [k for k in tags if k.startswith("val_") and not k.endswith("_ema")]:
            averaged = metrics.get(f"{key}_ema")
            if isinstance(averaged, int | float):
                tags |= {f"{key}_raw": tags[key], key: round(averaged, 6)}
        tags["weights"] = "ema"
    if getattr(spec.data, "eval_flip", False):  # the scores averaged an image and its mirror
        tags["eval_flip"] = "true"
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no version holds the alias yet
        holder = None
    old = float(holder.tags[metric]) if holder and metric in holder.tags else None
    lower = lower_is_better(metric)
    better = new is not None and (old is None or (new < old if lower else new > old))
    missed = _missed_budget(spec, trained.metrics)
    if holder and str(holder.version) == str(version):  # registered and promoted before
        decision = f"kept {name}@{alias}: v{version} {metric}={new} holds it already"
    else:
        if better and not missed:
            client.set_registered_model_alias(name, alias, version)
        versus = f"{metric}={new} vs " + (
            f"v{holder.version} {metric}={old}" if holder else "no current holder"
        )
        if missed:
            decision = f"kept {name}@{alias}: v{version} {missed}; {versus}"
        else:
            decision = f"{'promoted' if better else 'kept'} {name}@{alias}: v{version} {versus}"
    client.set_tag(run_id, "wrn_cluster.promotion", decision)
    client.set_model_version_tag(name, version, "promotion", decision)
    return version  # the job's summary says the decision, once (summary.py)


def _missed_budget(spec: JobBase, run_metrics: dict[str, float]) -> str | None:
    """Why a run fails tracking.max_device_hours, e.g. "did not reach val_top1 0.785 within 2
    device-hours (reached in 2.4)"; None when there is no budget or it kept to it."""
    budget, keys = spec.tracking.max_device_hours, spec.schedule.target_keys()
    if budget is None or keys is None:
        return None
    ((target, value),) = spec.schedule.stop_at.items()
    hours, goal = run_metrics.get(keys[1]), f"did not reach {target} {value:g}"
    if hours is None:
        return goal
    if hours > budget:
        return f"{goal} within {budget:g} device-hours (reached in {hours:.3g})"
    return None
