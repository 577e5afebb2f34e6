"""Where a job runs: an embedded local Ray in this process, or a cluster's Ray Jobs API."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from wrn_cluster import lease
from wrn_cluster.spec import ClassifyJob, DetectJob, TuneJob, to_yaml

Spec = ClassifyJob | DetectJob | TuneJob
PACKAGE_DIR = Path(__file__).resolve().parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Configuration (never credentials) a job on the cluster needs from the submitting shell; the
# cluster's nodes hold their own Ray token (RAY_AUTH_TOKEN), so the submitter's never travels.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


TRAIN_STATE_TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"
# Set for a submitted job's driver, so its MLflow run is tagged with where to watch it.
JOB_ID_ENV, DASHBOARD_ENV = "WRN_CLUSTER_JOB_ID", "WRN_CLUSTER_DASHBOARD_URL"


class LaunchError(Exception):
    """The job cannot start or did not finish; the message says what to check."""


def cluster_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def dashboard_url(address: str) -> str:
    return address if address.startswith("http") else f"http://{address}"


def local_cpus() -> int:
    """CPUs of the embedded Ray: WRN_CLUSTER_LOCAL_CPUS, else this machine's (at least 4)."""
    return int(os.environ.get("WRN_CLUSTER_LOCAL_CPUS", max(4, os.cpu_count() or 1)))


def run_local(spec: Spec, say: Callable[[str], None]) -> int:
    """Start an embedded Ray, run the job's driver here, print what a cluster run prints."""
    job_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Another `submit` of this job on this machine runs its own Ray: the lock file tells.
    try:
        with lease.file_lease(spec, lease.holder(job_id)):
            return _run_local(spec, job_id, say)
    except lease.JobRunningError as error:
        raise LaunchError(str(error)) from None


def _run_local(spec: Spec, job_id: str, say: Callable[[str], None]) -> int:
    import ray

    from wrn_cluster import driver, preflight

    try:
        driver.prepare(spec)  # the data, written first if synthetic
        preflight.check(spec)  # checkpoint storage, tracking server, registered model name
    except (driver.JobError, preflight.PreflightError) as error:
        raise LaunchError(str(error)) from None
    # The dashboard's Train view lists runs only when the trainer records their state.
    os.environ.setdefault(TRAIN_STATE_TRACKING, "1")
    context = ray.init(
        num_cpus=local_cpus(),
        object_store_memory=256 * 1024**2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level="WARNING",
        log_to_driver=True,
    )
    url = context.dashboard_url
    say(f"job {job_id} on an embedded local Ray")
    if url:
        say(f"dashboard: {dashboard_url(url)}  (Jobs and Train views)")
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":  # Ray's default since 2.59
            say("  sign in with the token `ray get-auth-token` prints (RAY_AUTH_MODE=token)")
    say(f"checkpoints: {spec.checkpoint.storage_url()}/{spec.name}")
    try:
        driver.run(spec, job_id, dashboard_url(url) if url else None)
    except driver.JobError as error:
        raise LaunchError(str(error)) from None
    finally:
        ray.shutdown()
    say(f"job {job_id} succeeded")
    return 0


def _token_file() -> str:
    """Where Ray reads its token when RAY_AUTH_TOKEN is unset."""
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")


def _refused(service: str, error) -> LaunchError:
    """One line for Ray's AuthenticationError, naming the setting to fix and never the token.
    Ray sends a token only with RAY_AUTH_MODE=token, read from RAY_AUTH_TOKEN, else the file
    RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token."""
    reason = (str(getattr(error, "message", "")).strip().splitlines() or [""])[0]
    token_file = _token_file()
    fix = f"set RAY_AUTH_TOKEN to the cluster's token or put it in {token_file}"
    if reason.startswith("Authentication failed"):  # HTTP 403: a token, but not the cluster's
        source = "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else token_file
        return LaunchError(f"{service} refused the Ray token from {source} as wrong; {fix}")
    if reason.startswith("Authentication required"):  # HTTP 401: no token sent
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            fix = f"export RAY_AUTH_MODE=token (Ray sends a token only then) and {fix}"
        return LaunchError(f"{service} requires a Ray token and none was sent; {fix}")
    if reason.startswith("RAY_AUTH_TOKEN_PATH"):
        found = f"RAY_AUTH_TOKEN_PATH names {token_file}, which is missing or empty"
    else:
        found = f"RAY_AUTH_MODE=token, but RAY_AUTH_TOKEN is unset and {token_file} has none"
    return LaunchError(f"no Ray token for {service}: {found}; {fix}")


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(dashboard_url(address))
    except AuthenticationError as error:
        raise _refused(f"the Ray Jobs API at {dashboard_url(address)}", error) from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise LaunchError(
            f"cannot reach the Ray Jobs API at {dashboard_url(address)} ({error}); check "
            "--address / RAY_ADDRESS (the dashboard, port 8265) and that the cluster is up"
        ) from None


def cluster_resources(address: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Total resources of the cluster's live nodes, read from its dashboard."""
    from ray.exceptions import AuthenticationError
    from ray.util.state import list_nodes

    url = dashboard_url(address)
    try:
        nodes = list_nodes(
            address=url, filters=[("state", "=", "ALIVE")], timeout=max(1, round(timeout_s))
        )
    except AuthenticationError as error:
        raise _refused(f"the Ray dashboard at {url}", error) from None
    except Exception as error:  # connection, HTTP and Ray's own state-API errors alike
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LaunchError(
            f"cannot read the resources of the cluster at {url} ({first.split('. ')[0]}); check "
            "--address / RAY_ADDRESS (the dashboard, port 8265) and that the cluster is up"
        ) from None
    total: dict[str, float] = {}
    for node in nodes:
        for key, value in (node.resources_total or {}).items():
            total[key] = total.get(key, 0.0) + float(value)
    return total


def submit_remote(spec: Spec, address: str, wait: bool, say: Callable[[str], None]) -> int:
    """Ship the package and the resolved spec to the cluster and run the driver there."""
    _refuse_credentials_in_urls()
    client = _client(address)
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env_vars[TRAIN_STATE_TRACKING] = "1"
    submission_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    env_vars[JOB_ID_ENV] = submission_id
    env_vars[DASHBOARD_ENV] = f"{dashboard_url(address)}/#/jobs/{submission_id}"
    with tempfile.TemporaryDirectory() as workdir:
        Path(workdir, "spec.yaml").write_text(to_yaml(spec))
        request = {
            "entrypoint": "python -m wrn_cluster.driver spec.yaml",
            "submission_id": submission_id,
            "runtime_env": {
                "working_dir": workdir,
                "py_modules": [str(PACKAGE_DIR)],
                "env_vars": env_vars,
                "excludes": ["__pycache__"],
            },
            "metadata": {"job_name": spec.name, "kind": spec.kind},
        }
        job_id = _submit_when_ready(client, request, address)
    say(f"job {job_id} submitted")
    say(f"dashboard: {dashboard_url(address)}/#/jobs/{job_id}")
    if not wait:
        return 0
    return follow(address, job_id, sys.stdout.write)


def _refuse_credentials_in_urls() -> None:
    """A forwarded URL with user:password@ in it would show in the job's runtime env."""
    for key in FORWARDED_ENV:
        parts = urlsplit(os.environ.get(key, ""))
        if parts.password or "@" in parts.netloc:
            shown = parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[-1]).geturl()
            raise LaunchError(
                f"{key}: {shown} holds credentials (a user:password@ part), which would travel "
                "to the cluster in the job's runtime env; take them out and set them in the "
                "cluster's environment (e.g. MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
            )


def _submit_when_ready(client, request: dict, address: str, wait_s: float = 90.0) -> str:
    """Submit, waiting out a head node whose job agent is still starting."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**request)
        except RuntimeError as error:
            starting = "No available agent" in str(error)
            if not starting or time.monotonic() > deadline:
                reason = str(error).strip().splitlines()[-1]
                raise LaunchError(
                    f"the Ray Jobs API at {dashboard_url(address)} refused the job: {reason}"
                ) from None
            time.sleep(2)


def follow(address: str, job_id: str, write: Callable[[str], object]) -> int:
    """Stream a job's logs until it ends; the exit code is the job's outcome."""
    client = _client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())
    status = wait_for_end(client, job_id)
    return 0 if status == "SUCCEEDED" else 1


def wait_for_end(client, job_id: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id))
    return status.split(".")[-1]


def job_info(address: str, job_id: str) -> dict:
    info = _get(address, job_id)
    return {
        "job_id": info.submission_id,
        "status": str(info.status).split(".")[-1],
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "metadata": info.metadata,
    }


def _get(address: str, job_id: str):
    client = _client(address)
    try:
        return client.get_job_info(job_id)
    except RuntimeError:
        raise LaunchError(
            f"no job {job_id!r} on {dashboard_url(address)}; `wrn-cluster list` shows the jobs"
        ) from None


def job_logs(address: str, job_id: str) -> str:
    _get(address, job_id)
    return _client(address).get_job_logs(job_id)


def stop_job(address: str, job_id: str) -> bool:
    _get(address, job_id)
    return _client(address).stop_job(job_id)


def list_jobs(address: str) -> list[dict]:
    jobs = _client(address).list_jobs()
    return [
        {
            "job_id": j.submission_id or j.job_id,
            "status": str(j.status).split(".")[-1],
            "name": (j.metadata or {}).get("job_name", ""),
            "start_time": j.start_time,
        }
        for j in sorted(jobs, key=lambda j: j.start_time or 0)
    ]
