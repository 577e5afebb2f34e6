"""Shared service fixtures: each starts a real server on a free port and stops it afterwards."""

import os

import pytest

# Test clusters run without Ray token auth; a shell that exports a mode keeps it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train's controller looks at its workers every 2 s by default, so each run's start, each
# report's turn and its end wait up to that long. The tests' runs are seconds long: a 0.5 s poll
# saves 2-3 s a run (a 1-epoch digits run: 15.0 s -> 12.4 s). Ray propagates the variable to
# the controller and workers; `ray start` clusters and submitted jobs inherit it from here.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (what s3fs's own suite uses); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


# Test-only S3 credentials for moto; distinctive, so tests can grep for leaks.
S3_KEY_ID = "wrnclustertestkeyid"
S3_SECRET = "wrn-cluster-test-secret-5f1c2a"


@pytest.fixture(scope="session")
def s3_env(s3_server):
    """Environment naming the moto endpoint and its test credentials, with the buckets made."""
    import s3fs

    env = {
        "AWS_ENDPOINT_URL_S3": s3_server,
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    fs = s3fs.S3FileSystem(key=S3_KEY_ID, secret=S3_SECRET, endpoint_url=s3_server)
    for bucket in ("mlflow", "checkpoints"):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    return env


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_env):
    """A real `mlflow server` on PostgreSQL with artifacts in moto's S3."""
    from tests.services import MlflowServer, Postgres

    root = tmp_path_factory.mktemp("mlflow")
    postgres = Postgres()
    try:
        backend = postgres.create_database("mlflow")
        server = MlflowServer(
            backend, "s3://mlflow/artifacts", {**os.environ, **s3_env}, root / "mlflow.log"
        )
        try:
            yield server
        finally:
            server.kill()
    finally:
        postgres.stop()


@pytest.fixture(scope="module")
def tracked(mlflow_server, s3_env, tmp_path_factory):
    """A local Ray whose workers see the tracking server and the S3 endpoint."""
    import ray
    from mlflow import MlflowClient

    from tests.datasets import write_digits_imagefolder
    from tests.util import free_port

    saved = dict(os.environ)
    os.environ.update(s3_env, MLFLOW_TRACKING_URI=mlflow_server.url)
    data = tmp_path_factory.mktemp("digits")
    write_digits_imagefolder(data, size=16)
    # With the dashboard: Ray Train finds dead controllers (a trial Tune stopped) through the
    # state API it serves, and only then frees their placement groups.
    ray.init(
        num_cpus=4,
        object_store_memory=128 * 1024**2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
    )
    try:
        yield {"server": mlflow_server, "data": data, "client": MlflowClient(mlflow_server.url)}
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
