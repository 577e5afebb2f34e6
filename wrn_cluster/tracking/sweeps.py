"""Sweeps: a search's parent run, one child run per trial (opened by the trial's rank 0), and at
the end the results on the parent, the trials' runs closed and the best trial's model registered."""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

from wrn_cluster.spec import TuneJob, flatten, to_yaml
from wrn_cluster.tracking.context import JOB_TAG, RunContext, experiment_id, params, run_tags
from wrn_cluster.tracking.registry import (
    RegistrationError,
    newest_ready_model,
    register,
    registration_error,
    retrying,
)
from wrn_cluster.tracking.server import client_for, display_uri, scrub


def open_sweep(spec: TuneJob, context: RunContext) -> str:
    """The search's parent run, with its spec; returns its id."""
    client = client_for(context.tracking_uri)
    experiment = experiment_id(client, context, spec.tracking.experiment)
    run = client.create_run(experiment, run_name=spec.name, tags=run_tags(spec, context))
    client.log_batch(run.info.run_id, params=params(flatten(spec)))
    client.log_text(run.info.run_id, to_yaml(spec), "spec.yaml")
    return run.info.run_id


def reopen_sweep(context: RunContext, run_id: str) -> bool:
    """Mark a resumed search's parent run running again; False when it is gone (deleted), so
    the search opens a new one."""
    from mlflow.exceptions import MlflowException

    client = client_for(context.tracking_uri)
    try:
        if client.get_run(run_id).info.lifecycle_stage != "active":
            return False
        client.update_run(run_id, status="RUNNING")
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return False
        raise
    return True


def end_run(context: RunContext, run_id: str, status: str) -> None:
    client_for(context.tracking_uri).set_terminated(run_id, status)


def finish_sweep(
    spec: TuneJob,
    context: RunContext,
    parent_run_id: str,
    rows: list[dict],
    table_csv: str,
    png: bytes,
    wait_s: float = 180.0,
) -> None:
    """Results table and plot on the parent; stopped trials' runs closed; the best trial's
    logged model registered. Raises RegistrationError when MLflow refuses any of it."""
    client = client_for(context.tracking_uri)
    deadline = time.monotonic() + wait_s

    def record():
        """Log the table and plot, close the trials' runs; the best trial's (row, run, model)."""
        client.log_text(parent_run_id, table_csv, "results.csv")
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch, "val_vs_params.png")
            path.write_bytes(png)
            client.log_artifact(parent_run_id, str(path))
        experiment = client.get_run(parent_run_id).info.experiment_id
        children = client.search_runs(
            [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
        )
        by_job = {run.data.tags.get(JOB_TAG): run for run in children}
        metric = f"best_{spec.tune.metric}"
        finished = {
            f"{spec.name}-{row.get('trial_id')}" for row in rows if row["status"] == "completed"
        }
        for run in children:
            if run.info.status == "RUNNING":  # the scheduler stops trials without warning
                done = run.data.tags.get(JOB_TAG) in finished
                client.set_terminated(run.info.run_id, "FINISHED" if done else "KILLED")
        for row in rows:  # best first
            child = by_job.get(f"{spec.name}-{row.get('trial_id')}")
            if row[metric] is None or child is None or row["status"] == "failed":
                continue
            model = newest_ready_model(client, experiment, child)
            if model:  # else it stopped before it logged a model
                client.set_tag(parent_run_id, "wrn_cluster.best_run_id", child.info.run_id)
                return row, child, model
        return None

    try:
        best = retrying(deadline, record, lambda error: _sweep_error(spec, parent_run_id, error))
        if best and spec.tracking.registered_model:
            row, child, model = best
            metrics = {k: v for k, v in child.data.metrics.items() if k.startswith("val_")}
            facts = {"arch": row["arch"], "params": row["params"], "gmacs": row["gmacs"]}
            retrying(
                deadline,
                lambda: register(client, spec, model, metrics, facts, parent_run_id),
                lambda error: registration_error(spec, model, error),
            )
    finally:
        try:
            client.set_terminated(parent_run_id, "FINISHED")  # the trials ran either way
        except Exception as error:  # the error above, if any, says more
            warnings.warn(f"could not mark the search's MLflow run finished: {error}", stacklevel=1)


def _sweep_error(spec: TuneJob, parent_run_id: str, error: Exception) -> RegistrationError:
    reason = scrub(" ".join(str(getattr(error, "message", error)).split()))
    return RegistrationError(
        f"search {spec.name!r} finished, but recording its results in MLflow "
        f"({display_uri()}, run {parent_run_id}) failed: {reason}; the trials' runs and "
        "checkpoints stay, and the results table is printed above"
    )
