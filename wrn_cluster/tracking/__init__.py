"""MLflow: the run of a job, its metrics, its model and the registry. The only package that
imports mlflow (inside functions: commands that do not track must not pay for it); training
calls it on rank 0 only.

server: the store's URI, clients, and the preflight check of the server and the login
names: registry names checked before training (the adapter over MLflow's validators)
context: RunContext, and what a run is filed under and tagged with
sender: MetricSender, the background thread that batches metrics
models: a trained network packaged as an MLflow model, with its model card
run: RunTracker, a job's run on rank 0, and end_unfinished_run for the driver
registry: registration of a job's logged model and the alias's promotion
sweeps: a search's parent run, its trials' runs and the best trial's registration
pull: pull and predict, for users of the registry
outcome: what a finished job left in MLflow, for its summary
"""

from wrn_cluster.tracking.context import JOB_TAG, RunContext, artifact_location, run_context
from wrn_cluster.tracking.models import MODEL_NAME, log_classifier, log_detector
from wrn_cluster.tracking.names import registry_name_problems
from wrn_cluster.tracking.outcome import job_outcome, recent_runs, run_details
from wrn_cluster.tracking.pull import predict, pull, resolve_version
from wrn_cluster.tracking.registry import (
    RegistrationError,
    log_trained_model,
    register,
    register_job,
    registered_sources,
)
from wrn_cluster.tracking.run import RunTracker, end_unfinished_run
from wrn_cluster.tracking.sender import BATCH_LIMIT, BUFFER_LIMIT, MetricSender
from wrn_cluster.tracking.server import (
    bind_fluent,
    check_server,
    client_for,
    display_uri,
    fluent_store,
    is_server,
    redacted,
    tracking_uri,
)
from wrn_cluster.tracking.sweeps import end_run, finish_sweep, open_sweep, reopen_sweep

__all__ = [
    "BATCH_LIMIT",
    "BUFFER_LIMIT",
    "JOB_TAG",
    "MODEL_NAME",
    "MetricSender",
    "RegistrationError",
    "RunContext",
    "RunTracker",
    "artifact_location",
    "bind_fluent",
    "check_server",
    "client_for",
    "display_uri",
    "end_run",
    "end_unfinished_run",
    "finish_sweep",
    "fluent_store",
    "is_server",
    "job_outcome",
    "recent_runs",
    "run_details",
    "log_classifier",
    "log_detector",
    "log_trained_model",
    "open_sweep",
    "reopen_sweep",
    "predict",
    "pull",
    "redacted",
    "register",
    "register_job",
    "registered_sources",
    "registry_name_problems",
    "resolve_version",
    "run_context",
    "tracking_uri",
]
