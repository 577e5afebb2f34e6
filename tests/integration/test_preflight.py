"""Preflight against real services: checkpoint storage on moto's S3, and a live MLflow server
named in the plan. The checks that need no service are in tests/unit/test_preflight.py."""

from __future__ import annotations

import pytest
import yaml

from tests.unit.test_preflight import embedded as embedded
from tests.unit.test_preflight import job
from wrn_cluster import preflight
from wrn_cluster.spec import parse


def test_checkpoint_storage_on_s3_is_written_read_and_cleaned(embedded, s3_env, monkeypatch):
    from tests.integration.test_tracking import bucket

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    good = parse(yaml.safe_dump(job(embedded, checkpoint={"storage": "s3://checkpoints/pf"})))
    preflight.check(good)
    assert not bucket().find("checkpoints/pf")  # the marker is gone
    missing = job(embedded, checkpoint={"storage": "s3://no-such-bucket-for-wrn/pf"})
    with pytest.raises(preflight.PreflightError) as caught:
        preflight.check(parse(yaml.safe_dump(missing)))
    (message,) = caught.value.problems
    assert "checkpoint.storage: bucket 'no-such-bucket-for-wrn'" in message
    assert "create it or set checkpoint.storage" in message


@pytest.mark.slow
def test_a_live_tracking_server_passes_and_is_named_in_the_plan(
    embedded, mlflow_server, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    report = preflight.dry_run(parse(yaml.safe_dump(job(embedded, data={"synthesize": {}}))), None)
    checks = dict(report.checks)
    assert checks["tracking"] == f"{mlflow_server.url}: answers and accepts the credentials"
    plan = dict(report.plan)
    assert plan["tracking"].startswith(f"{mlflow_server.url}, experiment 'preflight'")
