"""What a finished job left in MLflow, for its summary: the job's run (a search's parent run),
where the UI shows it, and the model version registered from the job with the alias decision
(the ``promotion`` tag the registry wrote on it)."""

from __future__ import annotations

from typing import Any

from wrn_cluster.spec import JobBase, lower_is_better
from wrn_cluster.tracking.context import JOB_TAG, RECIPE_TAG
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


# What `runs list` shows of a run: its kind's headline score, first found.
SCORE_KEYS = ("val_top1", "AP", "best_val_top1")


def recent_runs(tracking_uri: str, experiment: str | None = None, limit: int = 20) -> list[dict]:
    """The newest jobs' runs (a search's parent, never its trials), newest first, each with its
    status, epochs, headline score and the model versions registered from it."""
    client = client_for(tracking_uri)
    if experiment:
        found = client.get_experiment_by_name(experiment)
        experiments = [found] if found else []
    else:
        experiments = client.search_experiments()
    if not experiments:
        return []
    runs = client.search_runs(
        [e.experiment_id for e in experiments],
        max_results=max(limit * 10, 100),
        order_by=["attributes.start_time DESC"],
    )
    jobs = [r for r in runs if JOB_TAG in r.data.tags and "mlflow.parentRunId" not in r.data.tags]
    names = {e.experiment_id: e.name for e in experiments}
    versions = _versions_by_job(client)
    return [_row(run, names, versions) for run in jobs[:limit]]


def run_details(tracking_uri: str, ref: str) -> dict[str, Any] | None:
    """One run by its id, or the newest run of the job named ``ref``: params, latest metrics,
    tags, artifacts and registered versions; None if there is neither."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    try:
        run = client.get_run(ref)
    except MlflowException:
        matches = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`{JOB_TAG}` = '{ref}'",
            max_results=50,
            order_by=["attributes.start_time DESC"],
        )
        run = next((r for r in matches if "mlflow.parentRunId" not in r.data.tags), None)
        if run is None:
            return None
    experiment = client.get_experiment(run.info.experiment_id)
    row = _row(run, {experiment.experiment_id: experiment.name}, _versions_by_job(client))
    shown_tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    return {
        **row,
        "params": dict(sorted(run.data.params.items())),
        "metrics": {k: round(v, 6) for k, v in sorted(run.data.metrics.items())},
        "tags": dict(sorted(shown_tags.items())),
        "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
        "run_path": f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}",
    }


def _versions_by_job(client) -> dict[str, list[tuple[Any, list[str]]]]:
    """Job name -> its registered versions, each with the aliases it holds (the registered
    model knows them; a version found by search may not)."""
    aliases: dict[tuple[str, str], list[str]] = {}
    for model in client.search_registered_models(max_results=1000):
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault((model.name, str(version)), []).append(alias)
    by_job: dict[str, list] = {}
    for version in client.search_model_versions(max_results=1000):
        held = sorted(aliases.get((version.name, str(version.version)), []))
        by_job.setdefault(version.tags.get("job_name", ""), []).append((version, held))
    return by_job


def _row(run, experiment_names: dict[str, str], versions: dict[str, list]) -> dict[str, Any]:
    metrics, job = run.data.metrics, run.data.tags.get(JOB_TAG, "")
    score = next(((k, metrics[k]) for k in SCORE_KEYS if k in metrics), None)
    registered = [
        f"{v.name} v{v.version}" + "".join(f" @{alias}" for alias in held)
        for v, held in sorted(versions.get(job, []), key=lambda found: int(found[0].version))
        if v.run_id == run.info.run_id or run.data.params.get("kind") == "tune"
    ]
    return {
        "run_id": run.info.run_id,
        "job": job,
        "kind": run.data.params.get("kind", ""),
        "experiment": experiment_names.get(run.info.experiment_id, run.info.experiment_id),
        "status": run.info.status,
        "started": run.info.start_time,
        "epochs": int(metrics["epoch"]) if "epoch" in metrics else None,
        "score": {"metric": score[0], "value": round(score[1], 6)} if score else None,
        "versions": registered,
    }


def compare_runs(tracking_uri: str, experiment: str, limit: int = 20) -> list[dict] | None:
    """The newest jobs' runs of ``experiment`` (a search's parent, never its trials), newest
    first, side by side: recipe, epochs, best promotion metric, time and device-hours to the
    target, mean images/s. None when there is no such experiment."""
    client = client_for(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        max_results=max(limit * 10, 100),
        order_by=["attributes.start_time DESC"],
    )
    jobs = [r for r in runs if JOB_TAG in r.data.tags and "mlflow.parentRunId" not in r.data.tags]
    return [_comparison(client, run) for run in jobs[:limit]]


def _comparison(client, run) -> dict[str, Any]:
    run_id, metrics, params = run.info.run_id, run.data.metrics, run.data.params
    metric = params.get("tracking.promotion_metric", "val_top1")
    history = [m.value for m in client.get_metric_history(run_id, metric)]
    best = (min if lower_is_better(metric) else max)(history) if history else None
    speeds = [m.value for m in client.get_metric_history(run_id, "images_per_sec")]
    reached = next(
        (k.removeprefix("time_to_") for k in sorted(metrics) if k.startswith("time_to_")), None
    )
    hours = metrics.get(f"device_hours_to_{reached}")
    return {
        "job": run.data.tags[JOB_TAG],
        "run_id": run_id,
        "status": run.info.status,
        "recipe": run.data.tags.get(RECIPE_TAG),
        "epochs": int(metrics["epoch"]) if "epoch" in metrics else None,
        "metric": metric,
        "best": round(best, 6) if best is not None else None,
        "target": _target(reached, params),
        "time_to_target_s": round(metrics[f"time_to_{reached}"], 1) if reached else None,
        "device_hours_to_target": round(hours, 4) if hours is not None else None,
        "images_per_sec": round(sum(speeds) / len(speeds), 1) if speeds else None,
    }


def _target(reached: str | None, params: dict[str, str]) -> str | None:
    """The target a run reached (from time_to_val_top1_0.785: "val_top1 0.785"), else the one
    its spec aimed at (param schedule.stop_at.val_top1), else None."""
    if reached:
        name, _, value = reached.rpartition("_")
        return f"{name} {float(value):g}"
    aimed = next((k for k in sorted(params) if k.startswith("schedule.stop_at.")), None)
    return f"{aimed.removeprefix('schedule.stop_at.')} {float(params[aimed]):g}" if aimed else None
