"""What a finished job left in MLflow, for its summary: the job's run (a search's parent run),
where the UI shows it, and the model version registered from the job with the alias decision
(the ``promotion`` tag the registry wrote on it)."""

from __future__ import annotations

from typing import Any

from wrn_cluster.spec import JobBase
from wrn_cluster.tracking.context import JOB_TAG
from wrn_cluster.tracking.server import client_for, redacted


def job_outcome(tracking_uri: str, spec: JobBase) -> dict[str, Any]:
    """The job's newest run and its registered version; {} when the store has neither."""
    client = client_for(tracking_uri)
    experiment = client.get_experiment_by_name(spec.tracking.experiment)
    if experiment is None:
        return {}
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{JOB_TAG}` = '{spec.name}'",
        max_results=100,
        order_by=["attributes.start_time DESC"],
    )
    run = next((r for r in runs if "mlflow.parentRunId" not in r.data.tags), None)
    if run is None:
        return {}
    found: dict[str, Any] = {
        "tracking_uri": redacted(tracking_uri),
        "experiment_id": experiment.experiment_id,
        "run_id": run.info.run_id,
        "run_status": run.info.status,
        "run_path": f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}",
    }
    if tracking_uri.startswith(("http://", "https://")):
        found["run_url"] = f"{redacted(tracking_uri).rstrip('/')}/{found['run_path']}"
    name = spec.tracking.registered_model
    if name:
        versions = [
            v
            for v in client.search_model_versions(f"name = '{name}'")
            if v.tags.get("job_name") == spec.name
        ]
        if versions:
            newest = max(versions, key=lambda v: int(v.version))
            found["model"] = {
                "name": name,
                "version": str(newest.version),
                "alias": spec.tracking.alias,
                "decision": newest.tags.get("promotion", ""),
            }
    return found
