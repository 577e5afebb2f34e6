"""Builds the Ray Train trainer for a spec and runs it; also the Jobs API entrypoint.

`python -m wrn_cluster.driver SPEC.yaml` is what the launcher submits to a cluster.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import ray
import ray.train
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.torch import TorchConfig, TorchTrainer

from wrn_cluster import data, lease, preflight, tracking
from wrn_cluster.data import storage
from wrn_cluster.launcher import DASHBOARD_ENV, JOB_ID_ENV
from wrn_cluster.spec import ClassifyJob, DetectJob, SpecError, TuneJob, load


class JobError(Exception):
    """A job that cannot run or did not finish; the message says why and what to do."""


class ProgressPrinter(UserCallback):
    """One readable line per epoch; runs in the Train controller, whose output Ray forwards."""

    def __init__(self, job_name: str, epochs: int) -> None:
        self.job_name, self.epochs = job_name, epochs

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]
        saved = f"  checkpoint -> {checkpoint.path}" if checkpoint else ""
        if "AP" in m:  # a detection job: COCO's numbers
            scores = (
                f"train loss {m['train_loss']:.4f}  AP {m['AP']:.3f} AP50 {m['AP50']:.3f} "
                f"AP75 {m['AP75']:.3f} APs {m['APs']:.3f} APm {m['APm']:.3f} APl {m['APl']:.3f}"
            )
        else:
            scores = (
                f"train loss {m['train_loss']:.4f} top1 {m['train_top1']:.2%}  val loss "
                f"{m['val_loss']:.4f} top1 {m['val_top1']:.2%} top5 {m['val_top5']:.2%}"
            )
        print(
            f"[{self.job_name}] epoch {m['epoch']}/{self.epochs}  {scores}  "
            f"lr {m['lr']:.4g}  {m['images_per_sec']:.0f} img/s  {m['epoch_time_s']:.1f}s"
            f"{saved}",
            flush=True,
        )


def check_resources(spec: ClassifyJob) -> None:
    """Fail in seconds, not hang, when the cluster cannot hold the job's workers."""
    problem = preflight.resource_problem(spec, ray.cluster_resources())
    if problem:
        raise JobError(problem)


def build_trainer(
    spec: ClassifyJob | DetectJob,
    callbacks: list | None = None,
    tracking_context: dict | None = None,
) -> TorchTrainer:
    if spec.kind == "detect":
        from wrn_cluster.train.detect import train_detector as train_func
    else:
        from wrn_cluster.train.loop import train_classifier as train_func

    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    storage_path, storage_fs = storage.train_storage(spec.checkpoint.storage_url())
    return TorchTrainer(
        train_func,
        train_loop_config={"spec": spec.model_dump(mode="json"), "tracking": tracking_context},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=spec.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            callbacks=callbacks,
            # Our progress line says per epoch what Ray Train's INFO lines say per report.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def prepare(spec: ClassifyJob | DetectJob | TuneJob) -> None:
    """Everything that can fail before Ray starts: the data (written if synthetic), and a
    detector's backbone weights."""
    try:
        data.prepare(spec)
    except data.DataError as error:
        raise JobError(str(error)) from None
    weights = getattr(spec.model, "backbone_weights", None)
    if weights:
        from wrn_cluster.train.checkpoint import weights_path

        try:
            weights_path(weights)
        except (*storage.access_errors(), FileNotFoundError) as error:
            raise JobError(
                f"model.backbone_weights: {error}; point it at a classifier's checkpoint (its "
                "state.pt, its folder, or the job's run folder for the newest) of the same arch"
            ) from None


def run(
    spec: ClassifyJob | DetectJob | TuneJob,
    job_id: str | None = None,
    dashboard_url: str | None = None,
):
    """Run a prepared job on the Ray cluster this process is connected to: a Train result,
    or for a search, Tune's result grid. A run of the same job already going is not joined."""
    try:
        with lease.cluster_lease(spec, lease.holder(job_id)):
            return _run(spec, job_id, dashboard_url)
    except lease.JobRunningError as error:
        raise JobError(str(error)) from None


def _run(spec: ClassifyJob | DetectJob | TuneJob, job_id: str | None, dashboard_url: str | None):
    check_resources(spec)  # for a search: what one trial needs
    context = tracking.run_context(job_id, dashboard_url) if spec.tracking.enabled else None
    if context:
        print(f"[{spec.name}] MLflow: {context['tracking_uri']}", flush=True)
    if spec.kind == "tune":
        from wrn_cluster import tune

        try:
            return tune.run(spec, context)
        except (tune.SearchError, tracking.RegistrationError) as error:
            raise JobError(str(error)) from None
    printer = ProgressPrinter(spec.name, spec.schedule.epochs)
    trainer = build_trainer(spec, [printer], context)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        if context:
            tracking.end_unfinished_run(spec, context, "FAILED")
        raise JobError(f"job {spec.name!r} failed: {_failure(spec, error)}") from None
    if result.checkpoint is not None:
        print(f"[{spec.name}] checkpoints: {result.checkpoint.path}", flush=True)
    if context:
        try:
            tracking.register_job(spec, context, result.metrics)
        except tracking.RegistrationError as error:
            raise JobError(str(error)) from None
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
    try:
        prepare(spec)
        preflight.check(spec)
        ray.init()
        run(spec, os.environ.get(JOB_ID_ENV), os.environ.get(DASHBOARD_ENV))
    except (JobError, preflight.PreflightError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
