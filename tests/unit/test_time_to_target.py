"""Time to accuracy as a result (issue 18): `runs compare` sets an experiment's jobs side by
side, and with tracking.max_device_hours the registry promotes only a version whose run reached
schedule.stop_at within the budget. Runs are logged as the training loop logs them, into a real
SQLite MLflow store."""

import json

import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric, Param
from typer.testing import CliRunner

from tests.util import digits_job
from wrn_cluster import tracking
from wrn_cluster.cli import app
from wrn_cluster.spec import ClassifyJob
from wrn_cluster.tracking.context import RECIPE_TAG

TARGET = "val_top1_0.785"


def log_job(client, experiment, job, recipe, epochs, params=None, reached=None, start=0, **tags):
    """A job's run as rank 0 logs it: its tags and params, each epoch's metrics (``epochs``:
    one dict a epoch) with cumulative device_hours, and the time to target at the epoch that
    reached it (``reached``: (epoch, seconds, device-hours))."""
    run = client.create_run(
        experiment,
        start_time=1_700_000_000_000 + start,
        tags={tracking.JOB_TAG: job, RECIPE_TAG: recipe, **tags},
    )
    run_id = run.info.run_id
    given = {"tracking.promotion_metric": "val_top1", **(params or {})}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in given.items()])
    for step, values in enumerate(epochs, start=1):
        values = {"epoch": step, "device_hours": 0.5 * step, **values}
        client.log_batch(run_id, metrics=[Metric(k, v, 0, step) for k, v in values.items()])
    if reached:
        step, seconds, hours = reached
        client.log_batch(
            run_id,
            metrics=[
                Metric(f"time_to_{TARGET}", seconds, 0, step),
                Metric(f"device_hours_to_{TARGET}", hours, 0, step),
            ],
        )
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """Experiment "recipes": the paper's recipe without a target, a recipe that reached
    val_top1 0.785, one (promoted by val_loss) that stopped short of it, and a search's trial."""
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("recipes", artifact_location=(root / "art").as_uri())
    stop_at = {"schedule.stop_at.val_top1": 0.785}
    runs = {
        "paper": log_job(
            client,
            experiment,
            "wrn-28-10-paper",
            "paper",
            [
                {"val_top1": 0.70, "val_loss": 1.1, "images_per_sec": 1000.0},
                {"val_top1": 0.78, "val_loss": 0.9, "images_per_sec": 1100.0},
                {"val_top1": 0.77, "val_loss": 0.95, "images_per_sec": 1200.0},
            ],
            start=0,
        ),
        "reached": log_job(
            client,
            experiment,
            "wrn-28-10-fast",
            "rand_augment, label_smoothing 0.1",
            [
                {"val_top1": 0.74, "val_loss": 1.0, "images_per_sec": 2000.0},
                {"val_top1": 0.79, "val_loss": 0.8, "images_per_sec": 2400.0},
            ],
            params=stop_at,
            reached=(2, 3725.0, 4.14),
            start=1000,
        ),
        "short": log_job(
            client,
            experiment,
            "wrn-28-10-mixup",
            "mixup 0.2",
            [
                {"val_top1": 0.71, "val_loss": 0.97, "images_per_sec": 1500.0},
                {"val_top1": 0.76, "val_loss": 0.92, "images_per_sec": 1500.0},
            ],
            params={**stop_at, "tracking.promotion_metric": "val_loss"},
            start=2000,
        ),
    }
    search = log_job(client, experiment, "width-search", "paper", [], start=3000)
    log_job(
        client,
        experiment,
        "width-search-1",
        "paper",
        [{"val_top1": 0.5, "images_per_sec": 10.0}],
        start=3001,
        **{"mlflow.parentRunId": search},
    )
    runs["search"] = search
    return uri, runs


def compare(uri, monkeypatch, *args):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return CliRunner().invoke(app, ["runs", "compare", *args])


def test_runs_compare_sets_each_jobs_recipe_best_score_and_time_to_target_side_by_side(
    recipes, monkeypatch
):
    uri, runs = recipes
    result = compare(uri, monkeypatch, "recipes", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)

    assert [row["job"] for row in rows] == [
        "width-search",  # a search's parent run is a job; its trial is not
        "wrn-28-10-mixup",
        "wrn-28-10-fast",
        "wrn-28-10-paper",
    ]
    by_job = {row["job"]: row for row in rows}
    assert by_job["wrn-28-10-paper"] == {
        "job": "wrn-28-10-paper",
        "run_id": runs["paper"],
        "status": "FINISHED",
        "recipe": "paper",
        "epochs": 3,
        "metric": "val_top1",
        "best": 0.78,  # the best epoch, not the last
        "target": None,
        "time_to_target_s": None,
        "device_hours_to_target": None,
        "images_per_sec": 1100.0,
    }
    fast = by_job["wrn-28-10-fast"]
    assert (fast["recipe"], fast["epochs"], fast["best"]) == (
        "rand_augment, label_smoothing 0.1",
        2,
        0.79,
    )
    assert (fast["target"], fast["time_to_target_s"], fast["device_hours_to_target"]) == (
        "val_top1 0.785",
        3725.0,
        4.14,
    )
    assert fast["images_per_sec"] == 2200.0
    short = by_job["wrn-28-10-mixup"]
    assert (short["metric"], short["best"]) == ("val_loss", 0.92)  # a loss: its lowest
    assert (short["target"], short["time_to_target_s"]) == ("val_top1 0.785", None)

    table = compare(uri, monkeypatch, "recipes", "--limit", "3")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    (fast_line,) = [line for line in lines if "wrn-28-10-fast" in line]
    for cell in (runs["reached"][:8], "rand_augment, label_smoothing 0.1", "val_top1 0.79"):
        assert cell in fast_line
    for cell in ("val_top1 0.785", "1h 02m", "4.14", "2200"):
        assert cell in fast_line
    (short_line,) = [line for line in lines if "wrn-28-10-mixup" in line]
    assert "val_loss 0.92" in short_line and "not reached" in short_line
    assert not any("wrn-28-10-paper" in line for line in lines)  # --limit 3: the newest three


def test_runs_compare_of_an_unknown_experiment_says_so_in_one_line(recipes, monkeypatch):
    uri, _ = recipes
    result = compare(uri, monkeypatch, "no-such-experiment")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: no experiment named 'no-such-experiment' in {uri}; `wrn-cluster runs list` "
        "shows the recent runs and their experiments"
    ]


def budget_job(tmp_path) -> ClassifyJob:
    job = digits_job(
        tmp_path / "data",
        tmp_path / "runs",
        name="budget",
        schedule={"epochs": 8, "stop_at": {"val_top1": 0.785}},
        tracking={"enabled": True, "registered_model": "digits_budget", "max_device_hours": 2},
    )
    return ClassifyJob.model_validate(job)


def register_run(client, spec, experiment, val_top1, reached=None):
    """A run that ended at ``val_top1`` (reaching the target at ``reached`` device-hours, or
    not), its logged model, and that model registered as the driver registers it: with the last
    report, which does not carry the time to target."""
    run_id = log_job(
        client,
        experiment,
        spec.name,
        "ema 0.9999 every 32",
        [{"val_top1": val_top1}],
        reached=(1, reached * 1800, reached) if reached else None,
    )
    model = client.create_logged_model(experiment, source_run_id=run_id)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    version = tracking.register(client, spec, model, {"val_top1": val_top1}, {}, run_id)
    return client.get_model_version("digits_budget", version)


def test_with_a_device_hour_budget_only_versions_that_reached_the_target_within_it_are_promoted(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    spec = budget_job(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("budget", artifact_location=(tmp_path / "a").as_uri())

    never = register_run(client, spec, experiment, 0.70)
    within = register_run(client, spec, experiment, 0.786, reached=1.5)
    over = register_run(client, spec, experiment, 0.79, reached=2.4)
    faster = register_run(client, spec, experiment, 0.80, reached=1.9)

    assert never.tags["promotion"] == (
        "kept digits_budget@champion: v1 did not reach val_top1 0.785; "
        "val_top1=0.7 vs no current holder"
    )
    assert within.tags["promotion"].startswith("promoted digits_budget@champion: v2 ")
    assert over.tags["promotion"] == (
        "kept digits_budget@champion: v3 did not reach val_top1 0.785 within 2 device-hours "
        "(reached in 2.4); val_top1=0.79 vs v2 val_top1=0.786"
    )
    assert faster.tags["promotion"] == (
        "promoted digits_budget@champion: v4 val_top1=0.8 vs v2 val_top1=0.786"
    )
    assert str(client.get_model_version_by_alias("digits_budget", "champion").version) == "4"
    assert {k: over.tags[k] for k in over.tags if "_to_" in k or k == "recipe"} == {
        "recipe": "ema 0.9999 every 32",
        f"time_to_{TARGET}": "4320.0",
        f"device_hours_to_{TARGET}": "2.4",
    }
    assert "recipe" in never.tags and not any("_to_" in k for k in never.tags)
