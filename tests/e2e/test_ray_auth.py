"""The Jobs API against a `ray start --head` cluster with Ray token authentication
(RAY_AUTH_MODE=token): the token is taken from RAY_AUTH_TOKEN or Ray's token file; a wrong or
missing one is one line naming the setting; the token never travels with a job nor shows in
its logs."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.datasets import write_digits_imagefolder
from tests.util import digits_job, free_ports, get_json, node_ports, stop_processes_of, wait_until

pytestmark = pytest.mark.slow
VENV_BIN = str(Path(sys.executable).parent)
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Distinctive, so a leak into any output or runtime env is found by a plain substring test.
TOKEN = f"wrn-cluster-test-ray-token-{secrets.token_hex(8)}"


def shell_env(home: Path, **auth: str) -> dict[str, str]:
    """This process's environment with only the given Ray auth settings, and a HOME of its own,
    so Ray's default token file is home/.ray/auth_token and never the real ~/.ray."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
    return {**env, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "HOME": str(home), **auth}


@pytest.fixture(scope="module")
def cluster():
    # Short: Ray's unix sockets live under it, and their paths are limited to 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="wrn-auth-"))
    port, dashboard, client, *ports = free_ports(9)
    # Token mode for this head (and its workers and job drivers) only; conftest disables it for
    # every other test's Ray.
    env = shell_env(temp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
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
            lambda: _get(f"{address}/api/version") is not None,
            timeout=60,
            what=f"the dashboard at {address} to answer",
        )
        yield address
    finally:
        stop_processes_of(temp)  # only this cluster, never `ray stop`
        shutil.rmtree(temp, ignore_errors=True)


def _get(url: str, token: str = TOKEN):
    """The JSON the token-auth dashboard answers with; None while it answers nothing."""
    return get_json(url, headers={"Authorization": f"Bearer {token}"})


def _got(url: str, what: str):
    """The JSON at url once the dashboard answers (a loaded machine can miss a 5 s reply)."""
    return wait_until(lambda: _get(url), timeout=60, what=what)


def cli(*args, address, env, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def job(cluster, tmp_path_factory):
    """The module's one real job: 1 epoch on digits, submitted with the token in RAY_AUTH_TOKEN
    and followed to its end."""
    root = tmp_path_factory.mktemp("auth-job")
    write_digits_imagefolder(root / "digits", size=16)
    job = digits_job(
        root / "digits",
        root / "runs",
        name="auth-job",
        schedule={"epochs": 1, "warmup_epochs": 0},
        scaling={"workers": 1},  # the job only has to run, not to train well
    )
    spec_file = root / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    env = shell_env(root, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    submitted = cli("submit", str(spec_file), address=cluster, env=env, timeout=240)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.split("job ")[1].split()[0]
    return {"id": job_id, "spec": spec_file, "output": submitted.stdout + submitted.stderr}


def test_token_from_the_environment_submits_and_reads_the_job(cluster, job, tmp_path):
    env = shell_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    assert "epoch 1/1" in job["output"]  # the followed logs arrived through the token
    status = cli("status", job["id"], address=cluster, env=env)
    assert status.returncode == 0 and f"{job['id']}: SUCCEEDED" in status.stdout
    logs = cli("logs", job["id"], address=cluster, env=env)
    assert logs.returncode == 0 and "epoch 1/1" in logs.stdout
    listed = cli("list", address=cluster, env=env)
    assert listed.returncode == 0 and job["id"] in listed.stdout and "SUCCEEDED" in listed.stdout


def test_token_from_rays_token_file(cluster, job, tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(TOKEN + "\n")  # Ray strips the newline
    env = shell_env(tmp_path, RAY_AUTH_MODE="token")
    status = cli("status", job["id"], address=cluster, env=env)
    assert status.returncode == 0 and f"{job['id']}: SUCCEEDED" in status.stdout, status.stderr
    # The dry run reads the cluster's resources through the dashboard's state API.
    dry = cli("submit", str(job["spec"]), "--dry-run", address=cluster, env=env)
    assert dry.returncode == 0 and f"cluster at {cluster} has 4 CPU" in dry.stdout, dry.stderr

    elsewhere = tmp_path / "elsewhere" / "token"
    elsewhere.parent.mkdir()
    elsewhere.write_text(TOKEN)
    env = shell_env(tmp_path / "nowhere", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(elsewhere))
    listed = cli("list", address=cluster, env=env)
    assert listed.returncode == 0 and job["id"] in listed.stdout, listed.stderr


def test_wrong_or_missing_token_is_one_line_naming_the_setting(cluster, job, tmp_path):
    wrong = f"not-the-token-{secrets.token_hex(4)}"
    (tmp_path / "wrong-file" / ".ray").mkdir(parents=True)
    (tmp_path / "wrong-file" / ".ray" / "auth_token").write_text(wrong)
    home = tmp_path / "home"
    token_file = home / ".ray" / "auth_token"
    cases = {
        "wrong in the environment": (
            ["status", job["id"]],
            shell_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=wrong),
            "refused the Ray token from RAY_AUTH_TOKEN as wrong",
        ),
        "wrong in the token file": (
            ["list"],
            shell_env(tmp_path / "wrong-file", RAY_AUTH_MODE="token"),
            f"refused the Ray token from {tmp_path / 'wrong-file' / '.ray' / 'auth_token'}",
        ),
        "none anywhere": (
            ["logs", job["id"]],
            shell_env(home, RAY_AUTH_MODE="token"),
            f"RAY_AUTH_MODE=token, but RAY_AUTH_TOKEN is unset and {token_file} has none",
        ),
        "token mode off in this shell": (
            ["submit", str(job["spec"])],
            shell_env(home, RAY_AUTH_TOKEN=TOKEN),
            "requires a Ray token and none was sent; export RAY_AUTH_MODE=token",
        ),
    }
    for case, (args, env, expected) in cases.items():
        result = cli(*args, address=cluster, env=env)
        output = result.stdout + result.stderr
        assert result.returncode == 1, (case, output)
        assert expected in result.stderr, (case, output)
        assert "set RAY_AUTH_TOKEN to the cluster's token or put it in" in result.stderr, case
        assert len(result.stderr.strip().splitlines()) == 1, (case, output)
        assert "Traceback" not in output and TOKEN not in output and wrong not in output, case
    # The refused submit started nothing.
    jobs = _got(f"{cluster}/api/jobs/", "the job list")
    assert [j["submission_id"] for j in jobs] == [job["id"]]


def test_the_token_travels_neither_with_the_job_nor_into_its_logs(cluster, job):
    info = _got(f"{cluster}/api/jobs/{job['id']}", f"job {job['id']}'s record")
    assert info["status"] == "SUCCEEDED"
    env_vars = info["runtime_env"]["env_vars"]
    assert env_vars["WRN_CLUSTER_JOB_ID"] == job["id"]  # the forwarded settings are there
    assert not [k for k in env_vars if k.startswith("RAY_AUTH")]
    assert TOKEN not in json.dumps(info)
    logs = _got(f"{cluster}/api/jobs/{job['id']}/logs", f"job {job['id']}'s logs")["logs"]
    assert "epoch 1/1" in logs and TOKEN not in logs
    assert TOKEN not in job["output"]
