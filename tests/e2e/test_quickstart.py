"""The README's quickstarts as a new user runs them: `wrn-cluster submit jobs/...` with no MLflow
or Ray settings (embedded local Ray, MLflow on SQLite under ./.wrn-cluster), from a directory of
their own. Each registers its model in the project's store and leaves no `mlflow.db` behind. The
console shows the project's lines only, ending with the summary (`--json`: the same facts as one
object); the job's log file holds the rest."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)


# The shapes of the lines the project prints for a local job: the launcher's, the job's and its
# trials' own ([NAME] ..., [NAME-TRIAL] ...), the summary among them, and a search's table.
OWN_LINE = re.compile(
    r"^(log: \S+\.log  \(every line|job \S+ (on an embedded local Ray|succeeded)$|"
    r"dashboard: http://|checkpoints: |\[quickstart(-tune)?[\]-]|arch +depth +width|wrn-\d+-\d+ )"
)


def console_problems(console: str) -> list[str]:
    """Lines of a console that are not the project's: a third party's, or colour codes."""
    return [line for line in console.splitlines() if not OWN_LINE.match(line) or "\x1b" in line]


def cli(workdir: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """`wrn-cluster ARGS` run from ``workdir`` as a new user would, on the defaults."""
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
        [f"{VENV_BIN}/wrn-cluster", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def submit(workdir: Path, job: str, timeout: int, *flags: str) -> subprocess.CompletedProcess:
    shutil.copy(REPO / "jobs" / job, workdir / job)
    return cli(workdir, "submit", job, *flags, timeout=timeout)


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
    # The console: the project's lines only (the search's table, each trial's), the decision
    # once, and the summary.
    assert console_problems(done.stdout) == [], done.stdout
    assert done.stdout.count("@champion: v1") == 1, done.stdout
    assert "[quickstart-tune] summary: tune job quickstart-tune-" in done.stdout
    assert "[quickstart-tune]   trials       4 (0 failed)" in done.stdout

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
    # --json: the console's lines go to stderr, the summary's facts to stdout as one object.
    done = submit(tmp_path, "quickstart.yaml", 400, "--json")
    console, output = done.stderr, done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "epoch 6/6" in console and "Traceback" not in output
    assert console_problems(console) == [], console
    assert console.count("promoted wrn_quickstart@champion: v1") == 1, console
    assert stray_stores(tmp_path) == []

    client = project_store(tmp_path)
    champion = client.get_model_version_by_alias("wrn_quickstart", "champion")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert champion.run_id == run.info.run_id
    assert champion.tags["val_top1"] == str(round(run.data.metrics["val_top1"], 6))
    assert int(champion.tags["params"]) > 0

    # The summary's facts are the MLflow run's: its id, scores and registered version.
    facts = json.loads(done.stdout)
    assert facts["outcome"] == "succeeded" and facts["epochs"] == 6
    assert facts["mlflow"]["run_id"] == run.info.run_id
    assert facts["mlflow"]["model"]["version"] == str(champion.version) == "1"
    assert facts["mlflow"]["model"]["decision"] == champion.tags["promotion"]
    for name, value in facts["final"].items():
        assert value == round(run.data.metrics[name], 6), name
    assert facts["best"]["value"] == round(
        max(m.value for m in client.get_metric_history(run.info.run_id, "val_top1")), 6
    )
    assert f"[quickstart]   MLflow run   {run.info.run_id}" in console
    assert f"[quickstart]   model        wrn_quickstart v1: {champion.tags['promotion']}" in console

    # The log file holds the lines the console left out; `wrn-cluster logs` shows it.
    log = Path(facts["log"])
    assert log.parent == tmp_path / ".wrn-cluster" / "logs" and f"log: {log}" in console
    logged = cli(tmp_path, "logs", facts["job_id"], timeout=60)
    assert logged.returncode == 0 and logged.stdout == log.read_text()
    assert "(TrainController pid=" in logged.stdout and "[quickstart] epoch 6/6" in logged.stdout
