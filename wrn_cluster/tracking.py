"""MLflow: the run of a job, its metrics, its model and the registry. The only module that
imports mlflow; training calls it on rank 0 only."""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

from wrn_cluster.spec import ClassifyJob, flatten, home, to_yaml

log = logging.getLogger(__name__)
JOB_TAG = "wrn_cluster.job_name"
MODEL_NAME = "model"
# How many metric values wait for an unreachable server before the oldest are dropped.
BUFFER_LIMIT = 100_000
BATCH_LIMIT = 1000  # MLflow's most metrics per log_batch


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
def fluent_store(uri: str):
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


def client_for(uri: str):
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


@contextlib.contextmanager
def _environment(**values: str):
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


def _scrub(text: str) -> str:
    """A server's error text without the credentials this process holds."""
    for key in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME"):
        secret = os.environ.get(key)
        if secret:
            text = text.replace(secret, "***")
    return text.replace(tracking_uri(), display_uri())


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
                f"({_reason(_scrub(error.message))}); start it or fix MLFLOW_TRACKING_URI, or "
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


def registry_name_problems(name: str, alias: str) -> list[str]:
    """Why tracking.registered_model or tracking.alias would be refused by the registry (its own
    rules), or break `models:/NAME@ALIAS` URIs; empty when both are usable."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    problems = []
    try:
        validation._validate_model_name(name)
        if "@" in name:
            raise MlflowException(f"'{name}' holds '@', which models:/NAME@ALIAS URIs split on")
    except MlflowException as error:
        problems.append(
            f"tracking.registered_model: {error.message.rstrip('.')}; use letters, digits, '_', "
            "'-' and '.', e.g. wrn28_10_cifar10"
        )
    try:
        validation._validate_model_alias_name(alias)
        validation._validate_model_alias_name_reserved(alias)
    except MlflowException as error:
        problems.append(
            f"tracking.alias: {error.message.rstrip('.')}; use letters, digits, '_' and '-', "
            "e.g. champion"
        )
    return problems


def run_context(ray_job_id: str | None = None, dashboard_url: str | None = None) -> dict:
    """What the driver knows and rank 0 tags the run with; no credentials."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        project_version = version("wrn-cluster")
    except PackageNotFoundError:
        project_version = "unknown"
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    return {
        "tracking_uri": tracking_uri(),
        "artifact_root": str(home() / "mlartifacts"),
        "ray_job_id": ray_job_id,
        "dashboard_url": dashboard_url,
        "version": project_version,
        "git_commit": commit or None,
    }


def _experiment_id(client, context: dict, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = None
    if context["tracking_uri"].startswith("sqlite:"):  # keep artifacts under the home too
        location = artifact_location(context["artifact_root"], name)
    return client.create_experiment(name, artifact_location=location)


def artifact_location(root: str, experiment: str) -> str:
    """The file: URI of an experiment's artifacts: one folder under ``root``, whatever the name
    (a '/', '..' or absolute path in tracking.experiment cannot place them elsewhere)."""
    folder = quote(experiment, safe=" ")
    if folder in (".", ".."):
        folder = folder.replace(".", "%2E")
    return Path(root, folder).as_uri()


def _tags(spec, context: dict) -> dict[str, str]:
    tags = {
        JOB_TAG: spec.name,
        "wrn_cluster.kind": spec.kind,
        "wrn_cluster.arch": spec.model.arch,
        "wrn_cluster.dataset": spec.data.dataset,
        "wrn_cluster.version": context.get("version"),
        "ray.job_id": context.get("ray_job_id"),
        "ray.dashboard_url": context.get("dashboard_url"),
        "mlflow.source.git.commit": context.get("git_commit"),
        "mlflow.parentRunId": context.get("parent_run_id"),
    }
    return {k: str(v) for k, v in tags.items() if v}


class MetricSender:
    """Sends metrics from a background thread in batches: one request per ``flush_s``, sooner
    only when BATCH_LIMIT values wait (so logging every step costs the step nothing but an
    append); keeps them while the server is unreachable (bounded), warns once, and sends them
    when it answers again."""

    def __init__(self, client, run_id: str, retry_s: float = 2.0, flush_s: float = 1.0) -> None:
        self.client, self.run_id, self.retry_s, self.flush_s = client, run_id, retry_s, flush_s
        self.pending: collections.deque = collections.deque(maxlen=BUFFER_LIMIT)
        self.dropped = 0
        self.warned = False
        self.lock = threading.Condition()
        self.closing = False
        self.deadline = float("inf")
        self.thread = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def add(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self.lock:
            was_empty = not self.pending
            for key, value in metrics.items():
                if len(self.pending) == self.pending.maxlen:
                    self.dropped += 1
                self.pending.append(Metric(key, float(value), now, step))
            if was_empty or len(self.pending) >= BATCH_LIMIT:
                self.lock.notify()

    def _next_batch(self, last_sent: float) -> list | None:
        """Wait until a batch is due (a full one, flush_s since the last send, or closing);
        None when closing with nothing left."""
        with self.lock:
            while not self.closing:
                waited = time.monotonic() - last_sent
                if self.pending and (len(self.pending) >= BATCH_LIMIT or waited >= self.flush_s):
                    break
                self.lock.wait(self.flush_s - waited if self.pending else None)
            if not self.pending:
                return None
            return [self.pending[i] for i in range(min(len(self.pending), BATCH_LIMIT))]

    def _send_loop(self) -> None:
        last_sent = 0.0
        while (batch := self._next_batch(last_sent)) is not None:
            last_sent = time.monotonic()
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception as error:  # any transport or server error: keep and retry
                if not self.warned:
                    self.warned = True
                    warnings.warn(
                        f"MLflow at {redacted(self.client.tracking_uri)} is not answering "
                        f"({error}); training goes on and metrics are kept until it is back",
                        stacklevel=1,
                    )
                with self.lock:
                    if self.closing and time.monotonic() > self.deadline:
                        return
                time.sleep(self.retry_s)
                continue
            with self.lock:
                for sent in batch:  # a full buffer may have dropped some of them meanwhile
                    if self.pending and self.pending[0] is sent:
                        self.pending.popleft()
                if self.warned and not self.pending:
                    log.warning("MLflow is back; buffered metrics sent")
                    self.warned = False

    def close(self, timeout_s: float = 60.0) -> int:
        """Flush what is left; return how many values could not be sent."""
        with self.lock:
            self.closing = True
            self.deadline = time.monotonic() + timeout_s
            self.lock.notify()
        self.thread.join(timeout_s + self.retry_s + 5)
        return len(self.pending) + self.dropped


class RunTracker:
    """One MLflow run per job: opened (or continued) by rank 0, closed at the end."""

    def __init__(self, spec: ClassifyJob, context: dict, run_id: str | None = None) -> None:
        self.spec, self.context = spec, context
        self.client = client_for(context["tracking_uri"])
        bind_fluent(context["tracking_uri"])  # log_model and system metrics are fluent
        experiment_id = _experiment_id(self.client, context, spec.tracking.experiment)
        run_id = run_id or self._unfinished_run(experiment_id)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                experiment_id, run_name=spec.name, tags=_tags(spec, context)
            )
            self.run_id = run.info.run_id
            self._log_spec()
        self.sender = MetricSender(self.client, self.run_id)
        self.system = self._start_system_metrics()

    def _unfinished_run(self, experiment_id: str) -> str | None:
        """A run of this job left RUNNING by an attempt that died before its first checkpoint."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.`{JOB_TAG}` = '{self.spec.name}' and attributes.status = 'RUNNING'"
            ),
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0].info.run_id if runs else None

    def _log_spec(self) -> None:
        extra = {f"trial.{k}": v for k, v in (self.context.get("extra_params") or {}).items()}
        params = _params({**flatten(self.spec), **extra})
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, to_yaml(self.spec), "spec.yaml")

    def _start_system_metrics(self):
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=10, samples_before_logging=1
            )
            monitor.start()
            return monitor
        except Exception as error:  # optional: psutil/pynvml missing, or no server
            log.warning("system metrics are off: %s", error)
            return None

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Queue numeric metrics; returns at once, whatever the server's state."""
        numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        self.sender.add(numeric, step)

    def ship_model(
        self, net, class_names: list[str], image_size: int, wait_s: float = 180.0
    ) -> str | None:
        """log_model, waiting out a tracking server that is down for a while. The driver
        registers what was logged once training is over; the weights are in the checkpoint
        either way, so giving up only warns."""
        return self._until(
            time.monotonic() + wait_s,
            "log the model to MLflow",
            lambda: self.log_model(net, class_names, image_size)[0],
        )

    def ship_detector(
        self, net, categories: list[dict], options: dict[str, Any], wait_s: float = 180.0
    ) -> str | None:
        """log_detector, as ship_model does."""
        return self._until(
            time.monotonic() + wait_s,
            "log the model to MLflow",
            lambda: self.log_detector(net, categories, options)[0],
        )

    def _until(self, deadline: float, what: str, attempt):
        while True:
            try:
                return attempt()
            except Exception as error:  # server or store errors of any kind
                if time.monotonic() > deadline:
                    warnings.warn(
                        f"could not {what} ({error}); the weights stay in the job's last "
                        "checkpoint",
                        stacklevel=1,
                    )
                    return None
                time.sleep(5)

    def log_model(self, net, class_names: list[str], image_size: int) -> tuple[str, dict[str, Any]]:
        """Log the model in torch.export format, loadable without this package; returns its
        URI and the facts its registered version is tagged with."""
        import mlflow
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        from wrn_cluster.data import eval_resize
        from wrn_cluster.models import count_params, measure_gmacs
        from wrn_cluster.models.serving import ServingClassifier

        spec = self.spec
        mean, std = spec.data.mean_std()
        net = copy.deepcopy(net).float().cpu().eval()  # training's copy stays as it is
        serving = ServingClassifier(net, mean, std).eval()
        example = torch.rand(2, 3, image_size, image_size)
        with torch.no_grad():
            output = serving(example).numpy()
        preprocessing = {
            "input_size": image_size,
            "resize": eval_resize(spec),
            "mean": list(mean),
            "std": list(std),
            "input": "RGB float32 NCHW in [0, 1], resized then centre-cropped",
        }
        gmacs = measure_gmacs(net, image_size)
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(
                serving,
                name=MODEL_NAME,
                signature=infer_signature(example.numpy().astype(np.float32), output),
                input_example=example.numpy().astype(np.float32),
                serialization_format="pt2",
                metadata={"class_names": class_names, "preprocessing": preprocessing},
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "mlflow"],
            )
        self.client.log_dict(
            self.run_id, {"classes": class_names, **preprocessing}, "model_card.json"
        )
        facts = {"params": count_params(net), "gmacs": round(gmacs, 4)}
        self.client.log_batch(
            self.run_id, params=_params({f"model.{k}": v for k, v in facts.items()})
        )
        return info.model_uri, facts

    def log_detector(
        self, net, categories: list[dict], options: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """Log a detector as TorchScript (torch.export cannot trace torchvision's detectors:
        their NMS output sizes depend on the data); returns what log_model returns.

        TorchScript stores the code with the weights, so loading it needs torch and torchvision
        (imported first: it registers the nms/roi_align ops) but not this project, and runs no
        Python pickle. MLflow files it under serialization_format "pickle", its name for
        "not pt2"; the file itself is written by torch.jit.save."""
        import mlflow
        import torch
        import torchvision

        from wrn_cluster.models import count_params
        from wrn_cluster.models.serving import ServingDetector

        net = copy.deepcopy(net).float().cpu().eval()  # training's copy stays as it is
        serving = ServingDetector(net, [c["id"] for c in categories]).eval()
        with warnings.catch_warnings():  # torch marks TorchScript deprecated; it still works
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.script(serving)
        card = {
            "task": "detect",
            "categories": categories,
            "input": "list of RGB float32 [3, H, W] tensors in [0, 1], any size; resized inside "
            f"to a shorter side of {options['min_size']} (longer side at most "
            f"{options['max_size']})",
            "output": "per image: boxes [N, 4] x1, y1, x2, y2 in input pixels, scores, labels "
            "(1..K), category_ids (COCO ids)",
            "load": "import torchvision before loading (it registers the detection ops)",
            "detector": options,
        }
        # MLflow warns that the "pickle" format runs pickle; for a ScriptModule it does not.
        with mlflow.start_run(run_id=self.run_id), _quiet("mlflow.pytorch"):
            info = mlflow.pytorch.log_model(
                scripted,
                name=MODEL_NAME,
                serialization_format="pickle",
                metadata=card,
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"torchvision=={torchvision.__version__.split('+')[0]}",
                    "mlflow",
                ],
            )
        self.client.log_dict(self.run_id, card, "model_card.json")
        facts = {"params": count_params(net)}
        self.client.log_batch(
            self.run_id, params=_params({f"model.{k}": v for k, v in facts.items()})
        )
        return info.model_uri, facts

    def log_params(self, values: dict[str, Any]) -> None:
        """Facts found while running (e.g. what the data held), as run params."""
        params = _params(values)
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def close(self, status: str = "FINISHED") -> None:
        if self.system is not None:
            self.system.finish()
        unsent = self.sender.close()
        if unsent:
            warnings.warn(
                f"{unsent} metric values could not be sent to MLflow "
                f"({redacted(self.client.tracking_uri)}); the run's curves have gaps",
                stacklevel=1,
            )
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as error:
            warnings.warn(f"could not mark the MLflow run {status}: {error}", stacklevel=1)


def end_unfinished_run(spec: ClassifyJob, context: dict, status: str) -> None:
    """Mark the job's run ended when its workers could not (the job failed for good)."""
    try:
        client = client_for(context["tracking_uri"])
        experiment = client.get_experiment_by_name(spec.tracking.experiment)
        if experiment is None:
            return
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{JOB_TAG}` = '{spec.name}' and attributes.status = 'RUNNING'",
        )
        for run in runs:
            client.set_terminated(run.info.run_id, status)
    except Exception as error:  # the job's own error matters more than this bookkeeping
        warnings.warn(f"could not mark the MLflow run {status}: {error}", stacklevel=1)


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _params(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


class RegistrationError(Exception):
    """Training finished but its model is not registered; the message names the model, the run
    that holds it and what to do."""


# MLflow error codes another attempt cannot change: give up at once instead of waiting.
_FINAL_ERRORS = {
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "NOT_FOUND",
    "BAD_REQUEST",
    "INVALID_STATE",
}


def register_job(
    spec, context: dict, metrics: dict[str, Any] | None, wait_s: float = 180.0
) -> str | None:
    """Register the model a classification or detection job's run logged, once training is
    over (the driver calls it, with the last epoch's ``metrics`` from Ray Train; the run's own
    are used when no epoch ran); returns the version. Raises RegistrationError."""

    name = spec.tracking.registered_model
    if not name:
        return None
    client = client_for(context["tracking_uri"])

    def find():
        experiment = client.get_experiment_by_name(spec.tracking.experiment)
        runs = experiment and client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{JOB_TAG}` = '{spec.name}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if not runs:
            return None, None
        return runs[0], _newest_ready_model(client, experiment.experiment_id, runs[0])

    deadline = time.monotonic() + wait_s
    run, model = _retrying(deadline, find, lambda e: _registration_error(spec, None, e))
    if run is None:
        raise RegistrationError(
            f"job {spec.name!r} trained, but MLflow ({display_uri()}) has no run of it in "
            f"experiment {spec.tracking.experiment!r} to register {name!r} from; the weights "
            "are in the job's checkpoints"
        )
    if model is None:
        raise RegistrationError(
            f"job {spec.name!r} trained, but its MLflow run {run.info.run_id} holds no logged "
            f"model to register as {name!r} (the warning above says why); the weights are in "
            "the job's checkpoints"
        )
    facts = {
        key.removeprefix("model."): value
        for key, value in run.data.params.items()
        if key in ("model.params", "model.gmacs")
    }
    metrics = {k: v for k, v in (metrics or run.data.metrics).items() if isinstance(v, int | float)}
    return _retrying(
        deadline,
        lambda: register(client, spec, model, metrics, facts, run.info.run_id),
        lambda error: _registration_error(spec, model, error),
    )


def _newest_ready_model(client, experiment_id: str, run):
    """The run's newest logged model whose upload completed (a failed log_model leaves one
    FAILED or PENDING behind), else None."""
    from mlflow.entities import LoggedModelStatus

    logged = client.search_logged_models(
        [experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    return next((m for m in logged if m.status == LoggedModelStatus.READY), None)


def _retrying(deadline: float, attempt, failure):
    """attempt() until it succeeds; a final MLflow error, or any past the deadline, is raised
    as ``failure(error)``."""
    from mlflow.exceptions import MlflowException

    while True:
        try:
            return attempt()
        except (MlflowException, OSError) as error:  # the server's or the store's, not ours
            final = isinstance(error, MlflowException) and error.error_code in _FINAL_ERRORS
            if final or time.monotonic() > deadline:
                raise failure(error) from None
            time.sleep(5)


def _registration_error(spec, model, error: Exception) -> RegistrationError:
    text = str(getattr(error, "message", error))
    body = re.search(r"Response body: '([^']*)'", text)  # an HTTP error's plain-text answer
    reason = _scrub(" ".join((body.group(1) if body else text).split())).rstrip(".")
    code = getattr(error, "error_code", None)
    if code and code != "INTERNAL_ERROR":
        reason = f"{reason} ({code})"
    name = spec.tracking.registered_model
    if model is None:
        where = "the job's MLflow run keeps its metrics, and the weights are in its checkpoints"
        hint = "submit the job again once the server answers"
    else:
        where = (
            f"the model stays logged as {model.model_uri} in MLflow run {model.source_run_id}, "
            "and the weights are in the job's checkpoints"
        )
        hint = (
            f"register it once that is fixed: MLFLOW_TRACKING_URI={display_uri()} python -c "
            f"\"import mlflow; mlflow.register_model('{model.model_uri}', '{name}')\""
        )
    return RegistrationError(
        f"job {spec.name!r} trained, but registering its model as {name!r} in MLflow "
        f"({display_uri()}) failed: {reason}; {where}; {hint}"
    )


def register(
    client, spec, model, metrics: dict[str, float], facts: dict[str, Any], run_id: str
) -> str:
    """Register ``model`` (see _register) with the fluent URI on the client's store meanwhile."""
    with fluent_store(client.tracking_uri):
        return _register(client, spec, model, metrics, facts, run_id)


def _register(
    client, spec, model, metrics: dict[str, float], facts: dict[str, Any], run_id: str
) -> str:
    """A new version of tracking.registered_model from a logged model; the alias moves to it
    only if its promotion metric beats the version that holds the alias now. The decision is
    logged on the version and on run ``run_id`` (the job's run, or a search's parent run)."""
    from mlflow.exceptions import MlflowException

    name = spec.tracking.registered_model
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # A retried registration must not make a second version of the same logged model.
    found = [
        v
        for v in client.search_model_versions(
            f"name = '{name}' and run_id = '{model.source_run_id}'"
        )
        if v.source == model.model_uri
    ]
    version = (
        found[0].version
        if found
        else client.create_model_version(
            name, model.model_uri, run_id=model.source_run_id, model_id=model.model_id
        ).version
    )
    tags = {
        "dataset": spec.data.dataset,
        "job_name": spec.name,
        "arch": facts.get("arch", spec.model.arch),
        **facts,
        # Evaluation metrics: classification's val_*, detection's COCO AP*.
        **{k: round(v, 6) for k, v in metrics.items() if k.startswith(("val_", "AP"))},
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    alias, metric = spec.tracking.alias, spec.tracking.promotion_metric
    new = metrics.get(metric)
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no version holds the alias yet
        holder = None
    old = float(holder.tags[metric]) if holder and metric in holder.tags else None
    lower_is_better = metric.endswith("loss")
    better = new is not None and (old is None or (new < old if lower_is_better else new > old))
    if holder and str(holder.version) == str(version):  # registered and promoted before
        decision = f"kept {name}@{alias}: v{version} {metric}={new} holds it already"
    else:
        if better:
            client.set_registered_model_alias(name, alias, version)
        decision = (
            f"{'promoted' if better else 'kept'} {name}@{alias}: v{version} {metric}={new} vs "
            + (f"v{holder.version} {metric}={old}" if holder else "no current holder")
        )
    client.set_tag(run_id, "wrn_cluster.promotion", decision)
    client.set_model_version_tag(name, version, "promotion", decision)
    print(f"[{spec.name}] {decision}", flush=True)  # once, after a retry could repeat it
    return version


# ---------------------------------------------------------------------------------------------
# Sweeps: a parent run, one child run per trial (opened by the trial's rank 0)


def open_sweep(spec, context: dict) -> str:
    client = client_for(context["tracking_uri"])
    experiment_id = _experiment_id(client, context, spec.tracking.experiment)
    run = client.create_run(experiment_id, run_name=spec.name, tags=_tags(spec, context))
    client.log_batch(run.info.run_id, params=_params(flatten(spec)))
    client.log_text(run.info.run_id, to_yaml(spec), "spec.yaml")
    return run.info.run_id


def end_run(context: dict, run_id: str, status: str) -> None:
    client_for(context["tracking_uri"]).set_terminated(run_id, status)


def finish_sweep(
    spec,
    context: dict,
    parent_run_id: str,
    rows: list[dict],
    table_csv: str,
    png: bytes,
    wait_s: float = 180.0,
) -> None:
    """Results table and plot on the parent; stopped trials' runs closed; the best trial's
    logged model registered. Raises RegistrationError when MLflow refuses any of it."""
    client = client_for(context["tracking_uri"])
    deadline = time.monotonic() + wait_s

    def record():
        """Log the table and plot, close the trials' runs; the best trial's (row, run, model)."""
        client.log_text(parent_run_id, table_csv, "results.csv")
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch, "val_vs_params.png")
            path.write_bytes(png)
            client.log_artifact(parent_run_id, str(path))
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        children = client.search_runs(
            [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
        )
        by_job = {run.data.tags.get(JOB_TAG): run for run in children}
        metric = f"best_{spec.tune.metric}"
        finished = {
            f"{spec.name}-{row.get('trial_id')}" for row in rows if row["status"] == "completed"
        }
        for run in children:
            if run.info.status == "RUNNING":  # the scheduler stops trials without warning
                done = run.data.tags.get(JOB_TAG) in finished
                client.set_terminated(run.info.run_id, "FINISHED" if done else "KILLED")
        for row in rows:  # best first
            child = by_job.get(f"{spec.name}-{row.get('trial_id')}")
            if row[metric] is None or child is None or row["status"] == "failed":
                continue
            model = _newest_ready_model(client, experiment_id, child)
            if model:  # else it stopped before it logged a model
                client.set_tag(parent_run_id, "wrn_cluster.best_run_id", child.info.run_id)
                return row, child, model
        return None

    try:
        best = _retrying(deadline, record, lambda error: _sweep_error(spec, parent_run_id, error))
        if best and spec.tracking.registered_model:
            row, child, model = best
            metrics = {k: v for k, v in child.data.metrics.items() if k.startswith("val_")}
            facts = {"arch": row["arch"], "params": row["params"], "gmacs": row["gmacs"]}
            _retrying(
                deadline,
                lambda: register(client, spec, model, metrics, facts, parent_run_id),
                lambda error: _registration_error(spec, model, error),
            )
    finally:
        try:
            client.set_terminated(parent_run_id, "FINISHED")  # the trials ran either way
        except Exception as error:  # the error above, if any, says more
            warnings.warn(f"could not mark the search's MLflow run finished: {error}", stacklevel=1)


def _sweep_error(spec, parent_run_id: str, error: Exception) -> RegistrationError:
    reason = _scrub(" ".join(str(getattr(error, "message", error)).split()))
    return RegistrationError(
        f"search {spec.name!r} finished, but recording its results in MLflow "
        f"({display_uri()}, run {parent_run_id}) failed: {reason}; the trials' runs and "
        "checkpoints stay, and the results table is printed above"
    )


# ---------------------------------------------------------------------------------------------
# Pulling and predicting, for users of the registry


def resolve_version(model_uri: str):
    """The registry version behind models:/NAME@alias or models:/NAME/VERSION, else None."""

    if not model_uri.startswith("models:/"):
        return None
    client = client_for(tracking_uri())
    ref = model_uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, version = ref.split("/", 1)
    return client.get_model_version(name, version)


def pull(model_uri: str, dst: str | Path) -> dict[str, Any]:
    import mlflow

    bind_fluent(tracking_uri())
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; choose another --dst or empty it")
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch)
        for item in Path(local).iterdir():
            shutil.move(str(item), dst / item.name)
    version = resolve_version(model_uri)
    info = {"model_uri": model_uri, "path": str(dst)}
    if version is not None:
        info.update(
            name=version.name,
            version=version.version,
            run_id=version.run_id,
            source=version.source,
            aliases=list(version.aliases),
            tags=dict(version.tags),
        )
    return info


def predict(
    model_uri: str, images: list[Path], top: int = 5, min_score: float = 0.5
) -> list[list[tuple]]:
    """Per image, a classifier's top classes as (class, probability), or a detector's boxes
    scoring at least ``min_score`` (at most ``top``) as (category, score, [x1, y1, x2, y2]);
    preprocessed as the model's own metadata says."""
    import mlflow
    import torch
    from PIL import Image

    # Imported before loading: torchvision registers the ops scripted detectors call.
    from torchvision.transforms.v2 import functional as F

    bind_fluent(tracking_uri())
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    meta = mlflow.models.Model.load(local).metadata or {}
    pictures = []
    for path in images:
        with Image.open(path) as image:
            pictures.append(F.pil_to_tensor(image.convert("RGB")))
    if meta.get("task") == "detect":
        names = {c["id"]: c["name"] for c in meta["categories"]}
        # TorchScript's deprecation notices and torchvision's "always returns a tuple" note.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model = mlflow.pytorch.load_model(local)
            found = model([picture.float() / 255 for picture in pictures])
        return [
            [
                (names[int(category)], float(score), [round(v, 1) for v in box.tolist()])
                for box, score, category in zip(
                    f["boxes"], f["scores"], f["category_ids"], strict=True
                )
                if score >= min_score
            ][:top]
            for f in found
        ]
    model = mlflow.pytorch.load_model(local)
    prep, classes = meta["preprocessing"], meta["class_names"]
    batch = []
    for tensor in pictures:
        tensor = F.resize(tensor, prep["resize"], antialias=True)
        tensor = F.center_crop(tensor, prep["input_size"])
        batch.append(tensor.float() / 255)
    with torch.no_grad():
        probs = model(torch.stack(batch)).softmax(dim=1)
    values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
    return [
        [(classes[i], float(p)) for p, i in zip(row_p, row_i, strict=True)]
        for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True)
    ]
