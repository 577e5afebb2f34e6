"""The small adapters over MLflow's private API, and the run context that crosses processes;
no server. When an MLflow upgrade changes what its validators accept or say, these fail first
and name the rule that moved."""

import dataclasses
import pickle

import pytest

from wrn_cluster.tracking import RunContext, registry_name_problems, run_context
from wrn_cluster.tracking.names import alias_refusal, model_name_refusal


@pytest.mark.parametrize(
    "name", ["wrn28_10_cifar10", "wrn-50-2.imagenet", "WRN 28 10", "a" * 300, "wrn@2"]
)
def test_mlflow_accepts_these_registered_model_names(name):
    assert model_name_refusal(name) is None


@pytest.mark.parametrize(
    "name, says",
    [
        ("team/wrn", "Invalid model name 'team/wrn'. Names cannot contain '/' or ':'."),
        ("wrn:50", "Invalid model name 'wrn:50'. Names cannot contain '/' or ':'."),
        ("", "Missing value for required parameter 'name'"),
        ("   ", "Missing value for required parameter 'name'"),
    ],
)
def test_mlflow_refuses_these_registered_model_names_and_says_why(name, says):
    assert says in model_name_refusal(name)


@pytest.mark.parametrize("alias", ["champion", "best-v2", "v2b", "Champion_1", "a" * 255])
def test_mlflow_accepts_these_aliases(alias):
    assert alias_refusal(alias) is None


@pytest.mark.parametrize(
    "alias, says",
    [
        ("latest", "'latest' alias name (case insensitive) is reserved."),
        ("LATEST", "'latest' alias name (case insensitive) is reserved."),
        ("v2", "Version alias name 'v2' is reserved."),
        ("V10", "Version alias name 'V10' is reserved."),
        ("the best", "Invalid alias name: 'the best'."),
        ("best/1", "Invalid alias name: 'best/1'."),
        ("", "Registered model alias name cannot be empty."),
        ("a" * 256, "exceeds the maximum length of 255"),
    ],
)
def test_mlflow_refuses_these_aliases_and_says_why(alias, says):
    assert says in alias_refusal(alias)


def test_registry_name_problems_name_the_field_and_the_fix():
    assert registry_name_problems("wrn28_10_cifar10", "champion") == []
    problems = registry_name_problems("team/wrn", "latest")
    assert problems == [
        "tracking.registered_model: Invalid model name 'team/wrn'. Names cannot contain '/' or "
        "':'; use letters, digits, '_', '-' and '.', e.g. wrn28_10_cifar10",
        "tracking.alias: 'latest' alias name (case insensitive) is reserved; use letters, "
        "digits, '_' and '-', e.g. champion",
    ]
    (at,) = registry_name_problems("wrn@2", "champion")
    assert at.startswith("tracking.registered_model: 'wrn@2' holds '@'")


def test_the_run_context_survives_pickling_and_stays_frozen(tmp_path, monkeypatch):
    monkeypatch.setenv("WRN_CLUSTER_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    context = run_context("raysubmit_1", "http://127.0.0.1:8265/#/jobs/raysubmit_1")
    assert context.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert context.artifact_root == str(tmp_path / "mlartifacts")
    trial = dataclasses.replace(context, parent_run_id="p" * 32, extra_params={"lr": "0.1"})
    assert pickle.loads(pickle.dumps(trial)) == trial
    assert context.parent_run_id is None and context.extra_params == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.tracking_uri = "http://elsewhere"  # type: ignore[misc]
    assert RunContext("sqlite:///x.db", "/x").ray_job_id is None
