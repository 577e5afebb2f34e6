"""Where a job runs: an embedded local Ray in this process, or a cluster's Ray Jobs API."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from wrn_cluster import console, driver, lease, preflight, summary
from wrn_cluster.cluster import (
    DASHBOARD_ENV,
    JOB_ID_ENV,
    TRAIN_STATE_TRACKING,
    LaunchError,
    dashboard_url,
    jobs_client,
    local_cpus,
)
from wrn_cluster.jobs import follow
from wrn_cluster.spec import ClassifyJob, DetectJob, TuneJob, home, to_yaml

Spec = ClassifyJob | DetectJob | TuneJob
PACKAGE_DIR = Path(__file__).resolve().parent
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


def run_local(spec: Spec, verbose: bool = False, as_json: bool = False) -> int:
    """Start an embedded Ray, run the job's driver here, print what a cluster run prints.

    The console shows the project's lines and the summary; the job's whole output (Ray's,
    MLflow's and Python's lines too) goes to <home>/logs/JOB_ID.log (``verbose`` shows it all).
    With ``as_json`` the lines go to stderr and stdout gets the summary as one JSON object."""
    job_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    log = console.log_path(home(), job_id)
    routed = console.JobConsole(spec.name, log, verbose, to="stderr" if as_json else "stdout")
    started = time.monotonic()
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LaunchError(
            f"cannot write the job's log file in {log.parent} ({error.strerror}); set "
            "WRN_CLUSTER_HOME to a folder you can write"
        ) from None
    try:
        with routed:
            routed.say(f"log: {log}  (every line of the job; --verbose shows them here)")
            # Another `submit` of this job on this machine runs its own Ray: the lock file tells.
            with lease.file_lease(spec, lease.holder(job_id)):
                result = _run_local(spec, job_id, routed.say)
            found = summary.safe_facts(spec, job_id, result, time.monotonic() - started)
            for line in summary.lines(found):
                routed.say(line)
            routed.say(f"job {job_id} succeeded")
    except (lease.JobRunningError, LaunchError) as error:
        if as_json:
            failed = {"job": spec.name, "job_id": job_id, "outcome": "failed", "log": str(log)}
            print(json.dumps({**failed, "error": str(error)}), flush=True)
        raise LaunchError(f"{error} (the job's whole output: {log})") from None
    if as_json:
        print(json.dumps({**found, "log": str(log)}), flush=True)
    return 0


def _run_local(spec: Spec, job_id: str, say: Callable[[str], None]):
    import ray

    def start_embedded_ray() -> str | None:
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
        return dashboard_url(url) if url else None

    try:
        return driver.execute(spec, job_id, connect=start_embedded_ray, say=say)
    except (driver.JobError, preflight.PreflightError) as error:
        raise LaunchError(str(error)) from None
    finally:
        if ray.is_initialized():
            ray.shutdown()


def submit_remote(
    spec: Spec, address: str, wait: bool, say: Callable[[str], None], verbose: bool = False
) -> int:
    """Ship the package and the resolved spec to the cluster and run the driver there. While
    it is followed, the job's log shows the project's lines (all of them with ``verbose``) and
    goes whole to <home>/logs/JOB_ID.log (`wrn-cluster logs JOB_ID` reads Ray's copy)."""
    _refuse_credentials_in_urls()
    client = jobs_client(address)
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
    log = console.log_path(home(), job_id)
    say(f"log: {log}  (every line of the job; --verbose shows them here)")
    followed = console.FollowedLog(spec.name, log, _write_now, verbose)
    try:
        return follow(address, job_id, followed.write)
    finally:
        followed.close()


def _write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


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
