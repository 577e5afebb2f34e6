"""The README's quickstarts as a new user runs them: `wrn-cluster submit jobs/...` with no MLflow
or Ray settings (embedded local Ray, MLflow on SQLite under ./.wrn-cluster), from a directory of
their own. Each registers its model in the project's store and leaves no `mlflow.db` behind."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)


def submit(workdir: Path, job: str, timeout: int) -> subprocess.CompletedProcess:
    """`wrn-cluster submit JOB` run from ``workdir`` as a new user would, on the defaults."""
    shutil.copy(REPO / "jobs" / job, workdir / job)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "RAY_", "WRN_CLUSTER_", "AWS_"))
    }
    env.update(
        PATH=f"{VENV_BIN}:{env['PATH']}",
        RAY_AUTH_MODE="disabled",
        WRN_CLUSTER_LOCAL_CPUS="4",  # 2 workers and the driver on this machine's 2 cores
    )
    return subprocess.run(
        [f"{VENV_BIN}/wrn-cluster", "submit", job],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def project_store(workdir: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{workdir / '.wrn-cluster' / 'mlflow.db'}")


def stray_stores(workdir: Path) -> list[Path]:
    """MLflow stores anywhere under the directory but the project's own."""
    own = workdir / ".wrn-cluster" / "mlflow.db"
    return [p for p in workdir.rglob("mlflow.db") if p != own] + list(workdir.rglob("mlruns"))


def test_the_search_quickstart_registers_its_best_trial_in_the_projects_store(tmp_path):
    done = submit(tmp_path, "quickstart_tune.yaml", timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output
    assert "promoted wrn_quickstart_tune@champion: v1" in done.stdout, output
    assert stray_stores(tmp_path) == []

    client = project_store(tmp_path)
    champion = client.get_model_version_by_alias("wrn_quickstart_tune", "champion")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("quickstart-tune").experiment_id],
        "tags.`wrn_cluster.job_name` = 'quickstart-tune'",
    )
    assert champion.run_id == parent.data.tags["wrn_cluster.best_run_id"]
    assert champion.tags["arch"] in {"wrn-10-1", "wrn-10-2", "wrn-16-1", "wrn-16-2"}
    assert float(champion.tags["val_top1"]) > 0.25  # better than chance over 4 classes
    assert parent.info.status == "FINISHED"


def test_the_quickstart_registers_its_model_in_the_projects_store(tmp_path):
    done = submit(tmp_path, "quickstart.yaml", timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "epoch 6/6" in done.stdout and "Traceback" not in output
    assert "promoted wrn_quickstart@champion: v1" in done.stdout, output
    assert stray_stores(tmp_path) == []

    client = project_store(tmp_path)
    champion = client.get_model_version_by_alias("wrn_quickstart", "champion")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert champion.run_id == run.info.run_id
    assert champion.tags["val_top1"] == str(round(run.data.metrics["val_top1"], 6))
    assert int(champion.tags["params"]) > 0
