"""Width/depth searches on a real local Ray with a real MLflow server: ASHA stops poor trials,
the sweep is one parent run with child runs, the best network is registered; budgets skip
networks before they start; a failing trial does not stop the sweep. Search-space checks are
in tests/unit/test_tune.py."""

import pytest
import yaml
from PIL import Image

from tests.util import tune_job
from wrn_cluster import driver
from wrn_cluster.spec import parse

pytestmark = pytest.mark.slow


def search(tracked, name, space, epochs, **tune):
    job = tune_job(name, tracked["data"], f"s3://checkpoints/{name}", space, epochs, **tune)
    return parse(yaml.safe_dump(job), f"{name}.yaml")


def runs_of(client, experiment):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_asha_search_is_tracked_as_one_sweep_and_registers_the_best(tracked, capsys):
    spec = search(
        tracked,
        "sweep",
        {"model.width": {"grid": [1, 2]}, "optimizer.lr": {"grid": [0.05, 1e-5]}},
        epochs=3,
        grace_period=1,
        reduction_factor=2,
    )
    results = driver.run(spec)
    assert len(results) == 4 and not results.errors
    table = capsys.readouterr().out
    assert "stopped early" in table and "completed" in table
    header = next(line for line in table.splitlines() if line.startswith("arch "))
    assert "best_val_top1" in header and "params" in header and "gmacs" in header

    client = tracked["client"]
    (parent,), children = runs_of(client, "sweep")
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert all("trial.optimizer.lr" in c.data.params for c in children)
    stopped = [c for c in children if c.info.status == "KILLED"]
    assert stopped, "ASHA stopped no trial early"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "val_vs_params.png", "spec.yaml"} <= artifacts
    png = client.download_artifacts(parent.info.run_id, "val_vs_params.png")
    assert Image.open(png).size[0] > 500
    rows = client.download_artifacts(parent.info.run_id, "results.csv")
    with open(rows) as table_file:
        assert len(table_file.read().strip().splitlines()) == 5  # header + 4 trials

    champion = client.get_model_version_by_alias("sweep_best", "champion")
    best_child = (
        parent.data.tags.get("wrn_cluster.best_run_id")
        or client.get_run(parent.info.run_id).data.tags["wrn_cluster.best_run_id"]
    )
    assert champion.run_id == best_child
    assert float(champion.tags["val_top1"]) >= 0.9
    assert champion.tags["arch"] in ("wrn-10-1", "wrn-10-2")


def test_budget_skips_networks_before_they_start_and_a_failing_trial_does_not_stop_the_sweep(
    tracked, tmp_path, capsys
):
    empty = tmp_path / "no-data-here"
    empty.mkdir()
    spec = search(
        tracked,
        "budgeted",
        {"model.width": {"grid": [1, 8]}, "data.url": {"grid": [str(tracked["data"]), str(empty)]}},
        epochs=1,
        scheduler="fifo",
        budget={"max_params": 500_000},
    )
    results = driver.run(spec)
    out = capsys.readouterr().out
    assert "skipped by budget: wrn-10-8" in out
    assert len(results) == 2  # wrn-10-8 never became a trial
    assert len(results.errors) == 1  # the trial without data failed ...
    assert any(r.metrics and r.metrics.get("epoch") == 1 for r in results)  # ... the other ran
    _, children = runs_of(tracked["client"], "budgeted")
    assert all(c.data.params["model.arch"] == "wrn-10-1" for c in children)
