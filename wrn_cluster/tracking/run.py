"""A job's MLflow run, on rank 0: opened (or continued), its spec and params, metrics through
the sender, system metrics, and closed (the driver logs the model after fit()); and the
driver's close of a run its workers left open."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from wrn_cluster.spec import ClassifyJob, flatten, to_yaml
from wrn_cluster.tracking.context import JOB_TAG, RunContext, experiment_id, params, run_tags
from wrn_cluster.tracking.sender import MetricSender
from wrn_cluster.tracking.server import bind_fluent, client_for, redacted

log = logging.getLogger(__name__)


class RunTracker:
    """One MLflow run per job: opened (or continued) by rank 0, closed at the end."""

    def __init__(self, spec: ClassifyJob, context: RunContext, run_id: str | None = None) -> None:
        self.spec, self.context = spec, context
        self.client = client_for(context.tracking_uri)
        bind_fluent(context.tracking_uri)  # log_model and system metrics are fluent
        experiment = experiment_id(self.client, context, spec.tracking.experiment)
        run_id = run_id or self._unfinished_run(experiment)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                experiment, run_name=spec.name, tags=run_tags(spec, context)
            )
            self.run_id = run.info.run_id
            self._log_spec()
        self.sender = MetricSender(self.client, self.run_id)
        self.system = self._start_system_metrics()

    def _unfinished_run(self, experiment: str) -> str | None:
        """A run of this job left RUNNING by an attempt that died before its first checkpoint."""
        runs = self.client.search_runs(
            [experiment],
            filter_string=(
                f"tags.`{JOB_TAG}` = '{self.spec.name}' and attributes.status = 'RUNNING'"
            ),
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0].info.run_id if runs else None

    def _log_spec(self) -> None:
        extra = {f"trial.{k}": v for k, v in self.context.extra_params.items()}
        self.log_params({**flatten(self.spec), **extra})
        self.client.log_text(self.run_id, to_yaml(self.spec), "spec.yaml")

    def _start_system_metrics(self):
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=10, samples_before_logging=1
            )
            monitor.start()
            return monitor
        except Exception as error:  # optional: psutil/pynvml missing, or no server
            log.warning("system metrics are off: %s", error)
            return None

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Queue numeric metrics; returns at once, whatever the server's state."""
        numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        self.sender.add(numeric, step)

    def log_params(self, values: dict[str, Any]) -> None:
        """Facts found while running (e.g. what the data held), as run params."""
        batch = params(values)
        for i in range(0, len(batch), 100):  # MLflow's most params per log_batch
            self.client.log_batch(self.run_id, params=batch[i : i + 100])

    def close(self, status: str = "FINISHED") -> None:
        if self.system is not None:
            self.system.finish()
        unsent = self.sender.close()
        if unsent:
            warnings.warn(
                f"{unsent} metric values could not be sent to MLflow "
                f"({redacted(self.client.tracking_uri)}); the run's curves have gaps",
                stacklevel=1,
            )
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as error:
            warnings.warn(f"could not mark the MLflow run {status}: {error}", stacklevel=1)


def end_unfinished_run(spec: ClassifyJob, context: RunContext, status: str) -> None:
    """Mark the job's run ended when its workers could not (the job failed for good)."""
    try:
        client = client_for(context.tracking_uri)
        experiment = client.get_experiment_by_name(spec.tracking.experiment)
        if experiment is None:
            return
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{JOB_TAG}` = '{spec.name}' and attributes.status = 'RUNNING'",
        )
        for run in runs:
            client.set_terminated(run.info.run_id, status)
    except Exception as error:  # the job's own error matters more than this bookkeeping
        warnings.warn(f"could not mark the MLflow run {status}: {error}", stacklevel=1)
