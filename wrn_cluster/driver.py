"""One sequence for every way a job starts: prepare, preflight, connect to Ray, take the job's
lease, then fit (classify, detect) or search (tune), and register what was trained.

`wrn-cluster submit` on the embedded Ray calls ``execute`` in its own process; on a cluster the
Jobs API runs `python -m wrn_cluster.driver SPEC.yaml`, whose ``main`` calls the same
``execute``. Ray is imported inside the functions (the CLI imports this module).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from wrn_cluster import data, lease, preflight, summary, tracking, trainer, tune
from wrn_cluster.cluster import DASHBOARD_ENV, JOB_ID_ENV
from wrn_cluster.data import storage
from wrn_cluster.spec import ClassifyJob, DetectJob, SpecError, TuneJob, load
from wrn_cluster.train.checkpoint import weights_path

Spec = ClassifyJob | DetectJob | TuneJob


class JobError(Exception):
    """A job that cannot run or did not finish; the message says why and what to do."""


def say_now(line: str) -> None:
    """The driver's own lines, printed at once (a cluster job's log is followed live)."""
    print(line, flush=True)


def attach_to_cluster() -> str | None:
    """Connect to the Ray cluster this process runs in (a Jobs API driver); its dashboard URL,
    as the launcher named it."""
    import ray

    ray.init()
    return os.environ.get(DASHBOARD_ENV)


def execute(
    spec: Spec,
    job_id: str | None = None,
    connect: Callable[[], str | None] = attach_to_cluster,
    say: Callable[[str], None] = say_now,
):
    """Run a job from its spec to its registered model: what fit() or the search returned.

    ``connect`` starts or joins Ray once the checks pass and returns the dashboard's URL (or
    None); ``say`` prints the driver's own lines (a search's table among them). Raises
    JobError, or PreflightError for what the checks found."""
    prepare(spec)
    preflight.check(spec)
    return run(spec, job_id, connect(), say)


def run(
    spec: Spec,
    job_id: str | None = None,
    dashboard_url: str | None = None,
    say: Callable[[str], None] = say_now,
):
    """The part of ``execute`` after Ray is up: the job's lease, then fit or the search. A run
    of the same job already going is not joined."""
    try:
        with lease.cluster_lease(spec, lease.holder(job_id)):
            return _run(spec, job_id, dashboard_url, say)
    except lease.JobRunningError as error:
        raise JobError(str(error)) from None


def prepare(spec: Spec) -> None:
    """Everything that can fail before Ray starts: the data (written if synthetic), and a
    detector's backbone weights."""
    try:
        data.prepare(spec)
    except data.DataError as error:
        raise JobError(str(error)) from None
    weights = getattr(spec.model, "backbone_weights", None)
    if weights:
        try:
            weights_path(weights)
        except (*storage.access_errors(), FileNotFoundError) as error:
            raise JobError(
                f"model.backbone_weights: {error}; point it at a classifier's checkpoint (its "
                "state.pt, its folder, or the job's run folder for the newest) of the same arch"
            ) from None


def check_resources(spec: Spec) -> None:
    """Fail in seconds, not hang, when the cluster cannot hold the job's workers."""
    import ray

    problem = preflight.resource_problem(spec, ray.cluster_resources())
    if problem:
        raise JobError(problem)


def _run(spec: Spec, job_id: str | None, dashboard_url: str | None, say: Callable[[str], None]):
    import ray.train

    check_resources(spec)  # for a search: what one trial needs
    context = tracking.run_context(job_id, dashboard_url) if spec.tracking.enabled else None
    if context:
        say(f"[{spec.name}] MLflow: {context.tracking_uri}")
    if spec.kind == "tune":
        try:
            return tune.run(spec, context, say)
        except (tune.SearchError, tracking.RegistrationError) as error:
            raise JobError(str(error)) from None
    fit = trainer.build(spec, [trainer.progress_printer(spec)], context)
    try:
        result = fit.fit()
    except ray.train.TrainingFailedError as error:
        if context:
            tracking.end_unfinished_run(spec, context, "FAILED")
        raise JobError(f"job {spec.name!r} failed: {_failure(spec, error)}") from None
    if context and result.checkpoint is not None:
        try:
            run_id = trainer.log_final_model(spec, context, result.checkpoint)
            tracking.register_job(spec, context, result.metrics, run_id)
        except tracking.RegistrationError as error:
            if spec.tracking.registered_model:
                raise JobError(str(error)) from None
            # Nothing to register: the run and the checkpoints hold what the job trained.
            print(f"warning: {error}", file=sys.stderr, flush=True)
    return result


def _failure(spec: ClassifyJob | DetectJob, error: BaseException) -> str:
    """What stopped the run, in one line: the first worker's error, or the Train controller's;
    a storage outage says which storage and that nothing stored is lost."""
    failures = getattr(error, "worker_failures", None)
    cause = getattr(error, "controller_failure", None) or error
    if failures:
        first = failures[min(failures)]
        cause = getattr(first, "cause", None) or first
    text = " ".join(str(cause).split())
    if "Original Traceback" in str(cause):  # re-raised from a DataLoader process: its last line
        last = str(cause).strip().splitlines()[-1]
        name, _, message = last.partition(": ")
        return f"{name.rsplit('.', 1)[-1]}: {message}"
    if isinstance(cause, OSError) and "AWS Error" in text:  # Ray Train's own storage writes
        return (
            f"the checkpoint storage {spec.checkpoint.storage_url()} stopped answering "
            f"({text}); the checkpoints already stored are untouched; once it answers again, "
            "submit the same job name to resume from the last of them"
        )
    if failures:
        return f"{type(cause).__name__}: {text}"
    return str(error).splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m wrn_cluster.driver SPEC.yaml", file=sys.stderr)
        return 2
    try:
        spec = load(args[0])
    except SpecError as error:
        print(error, file=sys.stderr)
        return 1
    job_id = os.environ.get(JOB_ID_ENV)
    started = time.monotonic()
    try:
        result = execute(spec, job_id)
    except (JobError, preflight.PreflightError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    found = summary.safe_facts(spec, job_id or spec.name, result, time.monotonic() - started)
    print("\n".join(summary.lines(found)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
