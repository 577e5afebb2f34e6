"""End to end through the Ray Jobs API against a real `ray start --head` cluster with its
dashboard: submit, follow, status, list, logs, stop, refuse a second submission of a running job,
and resume by resubmitting the name."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import suppress
from pathlib import Path

import pytest
import torch
import yaml

from tests.datasets import write_digits_imagefolder
from tests.util import (
    digits_job,
    free_port,
    free_ports,
    get_json,
    node_ports,
    stop_processes_of,
    wait_until,
)
from wrn_cluster import jobs, launcher, preflight, spec
from wrn_cluster.train import checkpoint

pytestmark = pytest.mark.slow
STATE = checkpoint.STATE_FILE
EPOCHS = 30  # a fast machine trained 12 before the stop landed (done_before == 12)
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def cluster():
    # Short: Ray's unix sockets live under it, and their paths are limited to 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="wrn-jobs-"))
    port, dashboard, client, *ports = free_ports(9)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    # Every port its own, so another Ray on this machine (a test, a benchmark) cannot collide
    # with this head's dashboard agent, which takes the job submissions.
    start = [
        f"{VENV_BIN}/ray", "start", "--head", f"--port={port}", "--num-cpus=4",
        "--object-store-memory=134217728", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--temp-dir={temp}", "--disable-usage-stats",
        *node_ports(ports),
    ]  # fmt: skip
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
        address = f"http://127.0.0.1:{dashboard}"
        wait_until(
            lambda: get_json(f"{address}/api/version") is not None,
            timeout=60,
            what=f"the dashboard at {address} to answer",
        )
        yield address
    finally:
        stop_processes_of(temp)  # only this cluster, never `ray stop`
        shutil.rmtree(temp, ignore_errors=True)


def cli(*args, address, timeout=300, home: Path | None = None):
    env = {**os.environ, **({"WRN_CLUSTER_HOME": str(home)} if home else {})}
    return subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_submit_follow_refuse_a_second_stop_and_resume_through_the_jobs_api(cluster, tmp_path):
    # One job serves both checks: while it runs, a second submission of it is refused.
    data_root = tmp_path / "digits"
    write_digits_imagefolder(data_root, size=16)
    storage = tmp_path / "runs"
    # Epochs enough that the status, the refused submission and the stop all land mid-run.
    job = digits_job(data_root, storage, name="jobs-api", schedule={"epochs": EPOCHS})
    job["data"]["batch_size"] = 32  # 1438 images: 45 steps an epoch
    job["checkpoint"]["every_steps"] = 10  # most checkpoints fall inside an epoch
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job))

    first = cli("submit", str(spec_file), "--no-wait", address=cluster)
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.split("job ")[1].split()[0]
    assert f"{cluster}/#/jobs/{job_id}" in first.stdout

    run_dir = storage / "jobs-api"
    wait_until(
        lambda: list(run_dir.glob("checkpoint_*/state.pt")), 240, "the job's first checkpoint"
    )
    assert "RUNNING" in cli("status", job_id, address=cluster).stdout
    # The dashboard's Train view has the run with its workers, once its state actor reports.
    wait_until(
        lambda: any(
            run["name"] == "jobs-api" and run["attempts"]
            for run in (get_json(f"{cluster}/api/train/v2/runs/v1") or {}).get("train_runs", [])
        ),
        timeout=60,
        what="the dashboard's Train view to list run 'jobs-api' with an attempt",
    )

    clash = cli("submit", str(spec_file), address=cluster, timeout=200)
    assert clash.returncode == 1, clash.stdout + clash.stderr
    assert f"job 'jobs-api' is already running (submission {job_id} on " in clash.stdout
    # The refused submission started no run of its own: every checkpoint is the first one's.
    complete = [m.parent / STATE for m in run_dir.glob(f"checkpoint_*/{checkpoint.MANIFEST_FILE}")]
    states = []
    for path in complete:
        with suppress(FileNotFoundError):  # retention (checkpoint.keep) may retire it meanwhile
            states.append(torch.load(path, weights_only=True))
    assert states and all(state["resumes"] == [] for state in states)

    stopped = cli("stop", job_id, address=cluster)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout
    wait_until(
        lambda: "STOPPED" in cli("status", job_id, address=cluster).stdout,
        timeout=60,
        what=f"job {job_id} to be STOPPED",
    )
    done_before = _newest(run_dir)["epoch"]
    assert done_before < EPOCHS

    # Resubmitted on 1 worker instead of 2: the epoch goes on from the sample it stopped at.
    # The schedule ends two epochs after the stopped one (a resubmission may change its length,
    # as a longer one does in test_tracking): the rest of the 30 would only add minutes.
    epochs = done_before + 2
    second = cli(
        "submit", str(spec_file), "--set", "scaling.workers=1", "--set",
        f"schedule.epochs={epochs}", address=cluster, timeout=400, home=tmp_path / "home",
    )  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"epoch {epochs}/{epochs}" in second.stdout  # the followed logs show progress lines
    # Followed, the job's log shows the project's lines; the local log file holds them all.
    assert "pid=" not in second.stdout and "[jobs-api] summary: classify job" in second.stdout
    (followed_log,) = (tmp_path / "home" / "logs").glob("jobs-api-*.log")
    assert f"log: {followed_log}" in second.stdout
    assert "(TrainController pid=" in followed_log.read_text()
    state = _newest(run_dir)
    # It resumes from the newest checkpoint Ray Train had registered when the job stopped: the
    # newest folder on disk, or the one before it if the stop came while that was registering.
    (resumed_at,) = state["resumes"]
    assert state["epoch"] == epochs and 0 <= resumed_at <= done_before
    where = re.search(
        r"\[jobs-api\] resumed (?:in epoch (\d+)/\d+ after (\d+) samples|at the start of "
        r"epoch (\d+)/\d+) \(step (\d+)\)",
        second.stdout,
    )
    assert where, second.stdout
    epoch, samples, start, step = where.groups()
    # Step s of an epoch trains samples [32 s, 32 (s + 1)) of its order on any worker count
    # (tests/unit/test_order.py shows the order is the same): the resumed run takes the rest,
    # so the job trains 45 steps an epoch, every epoch, as an uninterrupted run does.
    in_epoch = int(samples) // 32 if samples else 0
    assert int(step) == (int(epoch or start) - 1) * 45 + in_epoch
    assert state["step"] == epochs * 45 and state["data_order"]["workers"] == 1
    assert f"epoch {resumed_at}/{epochs}" not in second.stdout  # done epochs are not redone

    listed = cli("list", address=cluster)
    assert job_id in listed.stdout and "STOPPED" in listed.stdout and "SUCCEEDED" in listed.stdout
    logs = cli("logs", job_id, address=cluster)
    assert f"epoch 1/{EPOCHS}" in logs.stdout


def test_credentials_inside_a_forwarded_url_never_reach_the_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://trainer:wrn-url-pw-31@mlflow:5000")
    job = spec.parse(yaml.safe_dump(digits_job(tmp_path, tmp_path / "runs")), "job.yaml")
    with pytest.raises(launcher.LaunchError) as caught:  # before any request to the cluster
        launcher.submit_remote(job, f"http://127.0.0.1:{free_port()}", False, print)
    message = str(caught.value)
    assert message.startswith("MLFLOW_TRACKING_URI: http://***@mlflow:5000 holds credentials")
    assert "wrn-url-pw-31" not in message and "trainer" not in message


def test_unknown_job_and_unreachable_cluster_are_one_message(cluster):
    missing = cli("status", "no-such-job", address=cluster)
    assert missing.returncode == 1
    assert "no job 'no-such-job'" in missing.stderr and "Traceback" not in missing.stderr
    down = cli("list", address=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1
    assert "cannot reach the Ray Jobs API" in down.stderr and "Traceback" not in down.stderr


def test_dry_run_checks_the_clusters_resources_and_submits_nothing(cluster, tmp_path):
    job = digits_job(tmp_path / "data", tmp_path / "runs", name="dry-run")
    job["data"]["synthesize"] = {"classes": 2, "per_class": 4, "size": 16}
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job))

    report = preflight.dry_run(spec.load(spec_file), cluster)
    assert dict(report.checks)["resources"] == f"cluster at {cluster} has 4 CPU, 0 GPU"
    assert dict(report.plan)["runs on"] == f"the cluster at {cluster}"
    assert not [j for j in jobs.list_jobs(cluster) if j["name"] == "dry-run"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()

    too_big = cli(
        "submit", str(spec_file), "--dry-run", "--set", "scaling.cpus_per_worker=3", address=cluster
    )
    assert too_big.returncode == 1 and "Traceback" not in too_big.stderr
    assert f"asks for 6 CPU (2 workers x 3 CPU), but the cluster at {cluster} has 4 CPU" in (
        too_big.stderr
    )


def _newest(run_dir: Path) -> dict:
    newest = max(run_dir.glob(f"checkpoint_*/{STATE}"))
    return torch.load(newest, weights_only=True)
