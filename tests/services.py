"""Real servers for tests: PostgreSQL (initdb/pg_ctl as the postgres user) and `mlflow server`,
optionally behind MLflow's basic-auth app.

Each runs on a free loopback port with its files in a temp dir, waits a bounded time to come
up, and is stopped by the fixture that started it.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from tests.util import free_port, wait_until


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if not found:
        raise RuntimeError(f"{name} not found: install PostgreSQL (.ci/run does it)")
    return found


def _as_postgres(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; run it as the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


class Postgres:
    def __init__(self) -> None:
        # Its own temp dir: pytest's are private to root, and postgres must reach this one.
        root = Path(tempfile.mkdtemp(prefix="wrn-cluster-pg-"))
        self.root, self.data = root, root / "pgdata"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
        subprocess.run(
            _as_postgres(
                [_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            _as_postgres(
                [
                    _pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-t", "60",
                    "-o", f"-p {self.port} -k {root} -h 127.0.0.1",
                    "-l", str(root / "postgres.log"), "start",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=90,
        )  # fmt: skip

    def create_database(self, name: str) -> str:
        subprocess.run(
            _as_postgres(
                [
                    _pg_bin("createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    name,
                ]
            ),
            check=True,
            capture_output=True,
            timeout=60,
        )
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def dump(self, name: str) -> str:
        """Everything the database holds, as SQL text (pg_dump), for tests that grep it."""
        dump = [_pg_bin("pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        return subprocess.run(
            _as_postgres([*dump, name]), check=True, capture_output=True, text=True, timeout=60
        ).stdout

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]),
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on PostgreSQL, serving artifacts from an S3 bucket (or a local folder);
    with ``app_name="basic-auth"`` and ``basic_auth_env``'s settings, behind a login."""

    def __init__(
        self,
        backend_uri: str,
        artifacts: str,
        env: dict[str, str],
        log: Path,
        app_name: str | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", backend_uri,
            "--artifacts-destination", artifacts,
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        if app_name:
            self.args += ["--app-name", app_name]
        self.env, self.log = env, log
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.args, env=self.env, stdout=out, stderr=out, start_new_session=True
            )
        wait_until(self._healthy, timeout=120, what=f"mlflow server {self.url} to be healthy")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: see {self.log}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """Take the server down hard, as a crash would (the whole process group)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def basic_auth_env(root: Path, admin: str, admin_password: str) -> dict[str, str]:
    """What `mlflow server --app-name basic-auth` reads: an .ini (MLFLOW_AUTH_CONFIG_PATH) with
    its users in SQLite under ``root``, the admin it creates on first start, READ for everyone
    else by default, accepted logins cached for a minute; and the static key its CSRF
    protection needs."""
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        f"admin_username = {admin}\n"
        f"admin_password = {admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each login check is a deliberately slow password hash; a job makes hundreds of calls.
        "auth_cache_ttl_seconds = 60\n"
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }


def create_user(url: str, admin: tuple[str, str], username: str, password: str) -> None:
    """A user on a basic-auth server, created by its admin through the REST API."""
    token = base64.b64encode(":".join(admin).encode()).decode()
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/users/create",
        data=json.dumps({"username": username, "password": password}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        if reply.status != 200:
            raise RuntimeError(f"creating MLflow user {username}: HTTP {reply.status}")
