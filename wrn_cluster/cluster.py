"""Where the Ray cluster is and what it holds: its address and dashboard, the embedded Ray's
CPUs, the Jobs API client, the live nodes' resources, and one line for a refused Ray token.

Below the preflight, the driver and the launcher, which all ask it. Ray is imported inside the
functions: commands that never reach a cluster do not load it.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def jobs_client(address: str):
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
