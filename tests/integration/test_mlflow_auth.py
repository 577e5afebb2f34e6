"""MLflow behind basic auth (`mlflow server --app-name basic-auth`, PostgreSQL backend): a job
with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD tracks as usual; missing or wrong
ones stop it in preflight with one message; and the password is nowhere the job wrote."""

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.datasets import write_digits_imagefolder
from tests.services import MlflowServer, Postgres, basic_auth_env, create_user
from tests.util import as_spec, digits_job
from wrn_cluster import preflight

pytestmark = pytest.mark.slow
ADMIN = ("wrn-admin", "wrn-admin-pw-3b8e")
USER, PASSWORD = "wrn-trainer", "wrn-auth-pw-7c91"
WRONG_PASSWORD = "wrn-wrong-pw-41d7"
MODEL = "digits_wrn_auth"
# The password alone, the pair, and the pair as an HTTP Basic header carries it.
SECRETS = [
    PASSWORD,
    f"{USER}:{PASSWORD}",
    base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
]
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A basic-auth `mlflow server` on its own PostgreSQL, artifacts served from a local folder,
    with an admin and one user who trains."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    postgres = Postgres()
    try:
        backend = postgres.create_database("mlflow_auth")
        env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
        env.update(basic_auth_env(root, *ADMIN))
        server = MlflowServer(
            backend, str(root / "artifacts"), env, root / "mlflow.log", app_name="basic-auth"
        )
        try:
            create_user(server.url, ADMIN, USER, PASSWORD)
            yield SimpleNamespace(
                url=server.url, root=root, postgres=postgres, database="mlflow_auth"
            )
        finally:
            server.kill()
    finally:
        postgres.stop()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_digits_imagefolder(root, size=16)
    return root


def auth_job(digits: Path, storage: Path) -> dict:
    """One epoch of the digits job, tracked, with a registered model."""
    tracking = {
        "enabled": True,
        "experiment": "digits-auth",
        "registered_model": MODEL,
        "log_every_steps": 10,
    }
    schedule = {"epochs": 1, "type": "cosine", "warmup_epochs": 0}
    return digits_job(digits, storage, name="auth", schedule=schedule, tracking=tracking)


def job_env(server_url: str, tmp: Path, **credentials: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*CREDENTIALS, "RAY_ADDRESS")}
    env.update(
        MLFLOW_TRACKING_URI=server_url,
        WRN_CLUSTER_HOME=str(tmp / "home"),
        WRN_CLUSTER_LOCAL_CPUS="4",
        **credentials,
    )
    return env


@pytest.fixture
def signed_in(auth_server, monkeypatch):
    """This process talks to the server as the training user."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    from mlflow import MlflowClient

    return MlflowClient(auth_server.url)


def leaks(blob: bytes) -> list[str]:
    return [secret for secret in SECRETS if secret.encode() in blob]


def leaking_files(root: Path) -> list[str]:
    """Files under root holding a secret, zip members (checkpoints, pt2 models) unpacked too."""
    found = []
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        blobs = [path.read_bytes()]
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                blobs += [archive.read(member) for member in archive.namelist()]
        if any(leaks(blob) for blob in blobs):
            found.append(str(path))
    return found


@pytest.mark.parametrize(
    "credentials, finding",
    [
        ({}, "asks for a login and none is set (UNAUTHENTICATED)"),
        ({"MLFLOW_TRACKING_USERNAME": USER}, "MLFLOW_TRACKING_PASSWORD is unset"),
        (
            {"MLFLOW_TRACKING_USERNAME": "nobody", "MLFLOW_TRACKING_PASSWORD": PASSWORD},
            "refused the credentials (UNAUTHENTICATED: an unknown user or a wrong password)",
        ),
    ],
    ids=["none", "no-password", "unknown-user"],
)
def test_missing_or_unknown_credentials_fail_in_preflight_with_one_message(
    auth_server, digits, tmp_path, monkeypatch, credentials, finding
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)
    for key in CREDENTIALS:
        monkeypatch.delenv(key, raising=False)
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    spec = as_spec(auth_job(digits, tmp_path / "runs"))
    with pytest.raises(preflight.PreflightError) as failed:
        preflight.check(spec)
    [problem] = failed.value.problems
    assert problem.startswith(f"MLFLOW_TRACKING_URI: the MLflow server at {auth_server.url} ")
    assert finding in problem
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in problem
    assert not leaks(problem.encode()) and "Traceback" not in problem


def test_credentials_inside_the_tracking_uri_are_refused_without_echoing_them(
    auth_server, digits, tmp_path, monkeypatch
):
    # MLflow would accept them, print them in its run links, and submit would forward them.
    host = auth_server.url.removeprefix("http://")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{USER}:{PASSWORD}@{host}")
    for key in CREDENTIALS:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(preflight.PreflightError) as failed:
        preflight.check(as_spec(auth_job(digits, tmp_path / "runs")))
    [problem] = failed.value.problems
    assert problem.startswith(f"MLFLOW_TRACKING_URI: http://***@{host} holds credentials")
    assert problem.endswith("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")
    assert not leaks(problem.encode())


def test_dry_run_with_a_wrong_password_fails_naming_the_settings_not_the_password(
    auth_server, digits, tmp_path
):
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(auth_job(digits, tmp_path / "runs")))
    env = job_env(
        auth_server.url,
        tmp_path,
        MLFLOW_TRACKING_USERNAME=USER,
        MLFLOW_TRACKING_PASSWORD=WRONG_PASSWORD,
    )
    run = subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: MLFLOW_TRACKING_URI: the MLflow server at {auth_server.url} refused the "
        "credentials (UNAUTHENTICATED: an unknown user or a wrong password); set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an "
        "account that may write runs"
    ]
    output = run.stdout + run.stderr
    assert "Traceback" not in output and WRONG_PASSWORD not in output
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def signed_in_job(auth_server, digits, tmp_path_factory):
    """One real job, `wrn-cluster submit` on an embedded local Ray, signed in as the user; Ray's
    own files (session logs) under a short temp dir of ours, so they can be searched too."""
    tmp = tmp_path_factory.mktemp("auth-job")
    ray_tmp = Path(tempfile.mkdtemp(prefix="wrn-ray-"))  # unix socket paths must stay short
    spec_file = tmp / "job.yaml"
    spec_file.write_text(yaml.safe_dump(auth_job(digits, tmp / "runs")))
    env = job_env(
        auth_server.url,
        tmp,
        MLFLOW_TRACKING_USERNAME=USER,
        MLFLOW_TRACKING_PASSWORD=PASSWORD,
        RAY_TMPDIR=str(ray_tmp),
    )
    try:
        run = subprocess.run(
            [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file)],
            capture_output=True,
            text=True,
            timeout=400,
            env=env,
        )
        yield SimpleNamespace(
            run=run,
            output=run.stdout + run.stderr,
            checkpoints=tmp / "runs",
            ray_tmp=ray_tmp,
            home=tmp / "home",
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_signed_in_job_tracks_its_run_metrics_and_model(signed_in_job, signed_in):
    assert signed_in_job.run.returncode == 0, signed_in_job.output[-5000:]
    client = signed_in
    experiment = client.get_experiment_by_name("digits-auth")
    [run] = client.search_runs([experiment.experiment_id], "tags.`wrn_cluster.job_name` = 'auth'")
    assert run.info.status == "FINISHED"
    assert run.data.params["kind"] == "classify" and run.data.params["scaling.workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [1]
    assert client.get_metric_history(run.info.run_id, "step_train_loss")
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1" and champion.run_id == run.info.run_id
    assert {"spec.yaml", "model_card.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    assert f"promoted {MODEL}@champion: v1" in signed_in_job.output


def test_the_password_is_nowhere_the_job_wrote(signed_in_job, signed_in, auth_server, tmp_path):
    import mlflow

    assert signed_in_job.run.returncode == 0, signed_in_job.output[-5000:]
    client = signed_in
    experiment = client.get_experiment_by_name("digits-auth")
    [run] = client.search_runs([experiment.experiment_id])
    version = client.get_model_version(MODEL, "1")
    logged = client.search_logged_models([experiment.experiment_id])
    seen_by_users = json.dumps(
        [
            run.data.params,
            run.data.tags,
            sorted(run.data.metrics),
            dict(run.info),
            version.tags,
            version.source,
            [model.to_dictionary() for model in logged],
        ],
        default=str,
    )
    assert not leaks(seen_by_users.encode())
    assert not leaks(signed_in_job.output.encode())  # the driver's and the workers' output

    # Everything a user downloads: the run's artifacts and the registered model.
    mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="", dst_path=str(tmp_path / "run")
    )
    mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{MODEL}/1", dst_path=str(tmp_path / "model")
    )
    assert (tmp_path / "model" / "MLmodel").is_file()
    assert leaking_files(tmp_path) == []

    assert list(signed_in_job.checkpoints.rglob("state.pt"))
    assert leaking_files(signed_in_job.checkpoints) == []
    assert list(signed_in_job.ray_tmp.rglob("*.log"))
    assert leaking_files(signed_in_job.ray_tmp) == []  # Ray's session logs
    assert list((signed_in_job.home / "logs").glob("auth-*.log"))
    assert leaking_files(signed_in_job.home) == []  # the job's own log file, and the rest

    # The server side: its database, artifact store, log, and its users' database (hashes).
    assert not leaks(auth_server.postgres.dump(auth_server.database).encode())
    assert leaking_files(auth_server.root) == []


def test_a_registry_that_refuses_the_model_is_one_error_line_and_the_training_is_kept(
    auth_server, digits, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    # The admin owns the registered model; the trainer may only read it (default READ).
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    admin = MlflowClient(auth_server.url)
    admin.create_registered_model("held_by_admin")
    job = auth_job(digits, tmp_path / "runs")
    job["name"] = "held"
    job["tracking"]["registered_model"] = "held_by_admin"
    spec_file = tmp_path / "held.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    env = job_env(
        auth_server.url, tmp_path, MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD
    )
    run = subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 1, output[-5000:]
    assert "Traceback" not in output and not leaks(output.encode())
    [error] = [line for line in output.splitlines() if line.startswith("error:")]

    experiment = admin.get_experiment_by_name("digits-auth")
    [trained] = admin.search_runs(
        [experiment.experiment_id], "tags.`wrn_cluster.job_name` = 'held'"
    )
    [logged] = admin.search_logged_models(
        [experiment.experiment_id], filter_string=f"source_run_id = '{trained.info.run_id}'"
    )
    assert error.startswith(
        "error: job 'held' trained, but registering its model as 'held_by_admin' in MLflow "
        f"({auth_server.url}) failed: Permission denied"
    ), error
    assert f"the model stays logged as {logged.model_uri} in MLflow run {trained.info.run_id}" in (
        error
    )
    # Nothing trained is lost: the run, its metrics and the checkpoint are all there.
    assert trained.info.status == "FINISHED" and "val_top1" in trained.data.metrics
    assert list((tmp_path / "runs" / "held").glob("checkpoint_*/state.pt"))
    assert admin.search_model_versions("name = 'held_by_admin'") == []
