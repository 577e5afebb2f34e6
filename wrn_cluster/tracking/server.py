"""The MLflow store a process talks to: its URI, clients, the fluent API's binding, and the
preflight check that the server answers and accepts this process's credentials."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from wrn_cluster.spec import home

if TYPE_CHECKING:
    from mlflow import MlflowClient


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded SQLite store under the project's home."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def bind_fluent(uri: str) -> None:
    """Point MLflow's fluent API (start_run, log_model, download_artifacts, load_model) of this
    process at the project's store for good; left unset it writes to MLflow's own ./mlflow.db.
    For processes that serve one job: a Train worker, `pull`, `predict`. The registry follows
    the tracking URI (a registry URI set here would stick to every later client)."""
    import mlflow

    mlflow.set_tracking_uri(uri)


@contextlib.contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """MLflow's fluent tracking URI set to ``uri`` for the block, then put back as it was: the
    driver may share its process (a test, a notebook) with other stores. Needed around model
    registration: MLflow's SQL registry resolves a ``models:/m-...`` source through the fluent
    URI, not the client's."""
    import mlflow

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # None: unset again
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def client_for(uri: str) -> MlflowClient:
    """An MlflowClient for ``uri``; the process's fluent API is left as it is."""
    from mlflow import MlflowClient

    # One request may otherwise retry for minutes; callers wait out outages themselves.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    return MlflowClient(uri)


def redacted(uri: str) -> str:
    """The URI without a user:password@ part, for messages and plans."""
    scheme, sep, rest = uri.partition("://")
    host, slash, path = rest.partition("/")
    if sep and "@" in host:
        return f"{scheme}://***@{host.rsplit('@', 1)[1]}{slash}{path}"
    return uri


def display_uri() -> str:
    return redacted(tracking_uri())


def is_server() -> bool:
    """Whether the tracking store is a server (http/https) rather than a local database."""
    return tracking_uri().startswith(("http://", "https://"))


def scrub(text: str) -> str:
    """A server's error text without the credentials this process holds."""
    for key in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME"):
        secret = os.environ.get(key)
        if secret:
            text = text.replace(secret, "***")
    return text.replace(tracking_uri(), display_uri())


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_server(timeout_s: float = 5.0) -> str | None:
    """None when the tracking server answers and accepts this process's credentials, else one
    message naming the setting and the fix. Local stores (SQLite, files) are not checked."""
    if not is_server():
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = display_uri()
    if uri != tracking_uri():
        return (
            f"MLFLOW_TRACKING_URI: {uri} holds credentials (a user:password@ part), which MLflow "
            "prints in its run links and submit forwards to the cluster; take them out of the "
            "URI and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead"
        )
    # One try with a short timeout: MLflow's defaults retry for minutes.
    limits = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout_s))),
    }
    with _environment(**limits):
        try:
            MlflowClient(tracking_uri()).search_experiments(max_results=1)
        except MlflowException as error:
            if error.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                return (
                    f"MLFLOW_TRACKING_URI: the MLflow server at {uri} "
                    f"{_login_finding(error.error_code)}; set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account that may "
                    "write runs"
                )
            return (
                f"MLFLOW_TRACKING_URI: no MLflow server answers at {uri} within {timeout_s:g}s "
                f"({_reason(scrub(error.message))}); start it or fix MLFLOW_TRACKING_URI, or "
                "set tracking.enabled: false to train without tracking"
            )
    return None


def _login_finding(error_code: str) -> str:
    """What went wrong with the login, naming settings and never their values: a server that
    asks for a login gets none unless both username and password (or a token) are set."""
    from mlflow.utils.credentials import read_mlflow_creds  # the environment, else ~/.mlflow

    creds = read_mlflow_creds()
    if error_code == "PERMISSION_DENIED":
        return f"refused the credentials ({error_code})"
    if creds.username and creds.password:  # used before a token, as MLflow's client does
        return f"refused the credentials ({error_code}: an unknown user or a wrong password)"
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return f"refused MLFLOW_TRACKING_TOKEN ({error_code})"
    if creds.username or creds.password:
        unset = "MLFLOW_TRACKING_PASSWORD" if creds.username else "MLFLOW_TRACKING_USERNAME"
        return f"asks for a login and {unset} is unset ({error_code})"
    return f"asks for a login and none is set ({error_code})"


def _reason(text: str) -> str:
    """The cause at the bottom of a requests/urllib3 error chain, e.g. 'Connection refused'."""
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found.group(1).strip()
    if "timed out" in text.lower():
        return "timed out"
    first = (text.strip().splitlines() or ["no answer"])[0]
    return first if len(first) <= 200 else first[:200] + "..."
