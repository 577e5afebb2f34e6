"""Multi-node Ray without Docker: a head and a second Ray node process on this machine, each its
own raylet with its own ports, S3 (moto) as the checkpoint storage they share, and a 2-worker job
submitted through the Jobs API that Ray SPREADs over both nodes."""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from tests.datasets import write_digits_imagefolder
from tests.util import digits_job, free_ports, node_ports, stop_processes_of, wait_until
from wrn_cluster.train import checkpoint

pytestmark = pytest.mark.slow
VENV_BIN = str(Path(sys.executable).parent)
BUCKET = "wrn-multinode"
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@pytest.fixture(scope="module")
def s3(s3_env):
    import s3fs

    fs = s3fs.S3FileSystem(
        key=s3_env["AWS_ACCESS_KEY_ID"],
        secret=s3_env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=s3_env["AWS_ENDPOINT_URL_S3"],
    )
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return fs


@pytest.fixture(scope="module")
def two_nodes(s3_env):
    """A head (with the dashboard) and a second node, 2 CPUs each; yields the dashboard URL.
    The nodes, and so every Ray worker and job driver, hold the S3 endpoint and credentials."""
    from ray.util.state import list_nodes

    # Short: Ray's unix sockets live under it, and their paths are limited to 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="wrn-mn-"))
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **s3_env}
    gcs, dashboard, client, *ports = free_ports(15)
    common = [
        "--node-ip-address=127.0.0.1", "--num-cpus=2", "--object-store-memory=100000000",
        f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    head = [
        f"{VENV_BIN}/ray", "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        *common, *node_ports(ports[:6]),
    ]  # fmt: skip
    second = [
        f"{VENV_BIN}/ray", "start", f"--address=127.0.0.1:{gcs}", *common, *node_ports(ports[6:]),
    ]  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        for command in (head, second):
            started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
            assert started.returncode == 0, started.stdout + started.stderr
        wait_until(
            lambda: len(_alive_nodes(list_nodes, address)) == 2,
            timeout=60,
            what="both nodes to be ALIVE in the state API",
        )
        yield address
    finally:
        stop_processes_of(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _train_workers(list_actors, address: str) -> list:
    """The job's RayTrainWorker actors once the state API lists both, else []."""
    try:
        workers = list_actors(
            address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True
        )
    except Exception:  # the state API is busy; ask again
        return []
    return workers if len(workers) >= 2 else []


def _alive_nodes(list_nodes, address: str) -> list:
    try:
        return [n for n in list_nodes(address=address) if n.state == "ALIVE"]
    except Exception:  # the dashboard is still starting
        return []


def test_two_workers_spread_over_two_nodes_and_checkpoint_to_s3(two_nodes, s3, s3_env, tmp_path):
    from ray.util.state import list_actors, list_nodes

    # The data stays on this machine's disk, which both nodes see (as they would an NFS mount);
    # everything Ray Train writes goes to S3.
    write_digits_imagefolder(tmp_path / "digits", size=16)
    job = digits_job(
        tmp_path / "digits",
        f"s3://{BUCKET}/runs",
        name="multinode",
        model={"arch": "wrn-10-1"},
        schedule={"epochs": 2, "warmup_epochs": 0},
        scaling={"workers": 2, "placement_strategy": "SPREAD"},
    )
    spec_file = tmp_path / "multinode.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    # The submitting shell holds the credentials too, as a user's would; only the endpoint
    # travels with the job: credentials come from the nodes' own environment.
    submitter_env = {**os.environ, **s3_env}
    run = subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file), "--address", two_nodes],
        capture_output=True,
        text=True,
        timeout=240,
        env=submitter_env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "epoch 2/2" in run.stdout, run.stdout

    # Not in the runtime env the dashboard shows, nor in the job's logs or the submit's output.
    from ray.job_submission import JobSubmissionClient

    job_id = run.stdout.split("job ", 1)[1].split()[0]
    client = JobSubmissionClient(two_nodes)
    shown = json.dumps(client.get_job_info(job_id).runtime_env) + client.get_job_logs(job_id)
    for name in CREDENTIAL_VARS:
        value = s3_env.get(name)
        assert not value or value not in shown + run.stdout + run.stderr, name
    assert s3_env["AWS_ENDPOINT_URL_S3"] in shown  # what does travel

    nodes = {n.node_id for n in list_nodes(address=two_nodes)}
    # The state API learns of the job's actors from the GCS a moment after they run.
    workers = wait_until(
        lambda: _train_workers(list_actors, two_nodes),
        timeout=60,
        what="the state API to list the job's 2 RayTrainWorker actors",
    )
    assert len(workers) == 2, workers  # one worker group: no restart
    assert len(nodes) == 2 and {w.node_id for w in workers} == nodes  # one worker on each node

    saved = sorted(s3.glob(f"{BUCKET}/runs/multinode/checkpoint_*/{checkpoint.STATE_FILE}"))
    assert len(saved) == 2, saved  # one per epoch, keep: 2
    state = torch.load(io.BytesIO(s3.cat_file(saved[-1])), weights_only=True)
    assert state["epoch"] == 2 and state["resumes"] == []
