"""What a job's MLflow runs are filed under and tagged with: the run context the driver makes
(it travels to the workers in train_loop_config, so it pickles), the experiment, tags, params."""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from wrn_cluster.spec import JobBase, home
from wrn_cluster.tracking.server import tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Param

JOB_TAG = "wrn_cluster.job_name"


@dataclass(frozen=True)
class RunContext:
    """What the driver knows and rank 0 tags the run with; no credentials."""

    tracking_uri: str
    artifact_root: str  # where an embedded (SQLite) store keeps its experiments' artifacts
    ray_job_id: str | None = None
    dashboard_url: str | None = None
    version: str | None = None  # of this project
    git_commit: str | None = None
    parent_run_id: str | None = None  # a search's run, for its trials' runs
    extra_params: dict[str, str] = field(default_factory=dict)  # a trial's point, as params


def run_context(ray_job_id: str | None = None, dashboard_url: str | None = None) -> RunContext:
    """The context of a job this process drives: its store, job, dashboard and code version."""
    try:
        project_version = version("wrn-cluster")
    except PackageNotFoundError:
        project_version = "unknown"
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    return RunContext(
        tracking_uri=tracking_uri(),
        artifact_root=str(home() / "mlartifacts"),
        ray_job_id=ray_job_id,
        dashboard_url=dashboard_url,
        version=project_version,
        git_commit=commit or None,
    )


def experiment_id(client: MlflowClient, context: RunContext, name: str) -> str:
    """The experiment called ``name``, made if missing."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = None
    if context.tracking_uri.startswith("sqlite:"):  # keep artifacts under the home too
        location = artifact_location(context.artifact_root, name)
    return client.create_experiment(name, artifact_location=location)


def artifact_location(root: str, experiment: str) -> str:
    """The file: URI of an experiment's artifacts: one folder under ``root``, whatever the name
    (a '/', '..' or absolute path in tracking.experiment cannot place them elsewhere)."""
    folder = quote(experiment, safe=" ")
    if folder in (".", ".."):
        folder = folder.replace(".", "%2E")
    return Path(root, folder).as_uri()


RECIPE_TAG = "wrn_cluster.recipe"


def run_tags(spec: JobBase, context: RunContext) -> dict[str, str]:
    """The tags a job's run (or a search's parent run) is opened with."""
    tags = {
        JOB_TAG: spec.name,
        "wrn_cluster.kind": spec.kind,
        "wrn_cluster.arch": spec.model.arch,
        "wrn_cluster.dataset": spec.data.dataset,
        # The recipe options on ("paper" for none), for `wrn-cluster runs compare`.
        RECIPE_TAG: ", ".join(getattr(spec, "recipe", list)()) or "paper",
        "wrn_cluster.version": context.version,
        "ray.job_id": context.ray_job_id,
        "ray.dashboard_url": context.dashboard_url,
        "mlflow.source.git.commit": context.git_commit,
        "mlflow.parentRunId": context.parent_run_id,
    }
    return {k: str(v) for k, v in tags.items() if v}


def params(values: dict[str, Any]) -> list[Param]:
    """Values as MLflow params, each cut to the 6000 characters MLflow keeps."""
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]
