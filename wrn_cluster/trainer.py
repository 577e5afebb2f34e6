"""The Ray Train TorchTrainer for a classify or detect spec, the driver's line per epoch, and
the network a finished run logs to MLflow from its last checkpoint.

Ray is imported inside the functions: the CLI imports this module for commands that never
start Ray.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from wrn_cluster import tracking
from wrn_cluster.data import storage
from wrn_cluster.models import build_model
from wrn_cluster.models.detection import from_checkpoint
from wrn_cluster.spec import ClassifyJob, DetectJob
from wrn_cluster.train import checkpoint
from wrn_cluster.train.checkpoint import prune as prune_checkpoints
from wrn_cluster.train.loop import train_func
from wrn_cluster.train.metrics import progress_line

if TYPE_CHECKING:
    import ray.train
    from ray.train.torch import TorchTrainer


def progress_printer(spec: ClassifyJob | DetectJob):
    """A Ray Train callback printing one readable line per epoch; it runs in the Train
    controller, whose output Ray forwards to the driver."""
    from ray.train import UserCallback

    class ProgressPrinter(UserCallback):
        # Ray calls it with keywords: the parameter names are Ray's.
        def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
            m, elastic = metrics[0], spec.scaling.elastic
            line = progress_line(spec.name, spec.kind, spec.schedule.epochs, m, elastic)
            print(line + (f"  checkpoint -> {checkpoint.path}" if checkpoint else ""), flush=True)

    return ProgressPrinter()


# How long the controller waits for the retention pass after the job's last epoch.
LAST_PASS_WAIT_S = 60.0


def retention(spec: ClassifyJob | DetectJob, context: tracking.RunContext | None):
    """A Ray Train callback that, after each checkpoint, retires the ones checkpoint.keep and
    keep_best do not hold, never the one just reported nor one a registered model version was
    made from. Ray keeps them all (num_to_keep=None): its own policy keeps the newest N or the
    best N, not both. It runs in the Train controller, on a thread of its own (listing the
    storage and asking the registry must not hold up the controller), one pass at a time: a
    checkpoint that comes while a pass runs is covered by the next. The pass after the job's
    last epoch is waited for (the controller ends soon after it); one cut short otherwise (a
    search stopping a trial) leaves a retired folder or two to the next."""
    from concurrent.futures import ThreadPoolExecutor, wait

    from ray.train import UserCallback

    model = spec.tracking.registered_model if context and spec.tracking.enabled else None
    policy = (spec.checkpoint.keep, spec.checkpoint.keep_best, spec.tracking.promotion_metric)

    def protected() -> set[str]:
        return tracking.registered_sources(context.tracking_uri, model) if model else set()

    class Retention(UserCallback):
        def __init__(self) -> None:
            self.known: dict = {}  # what each checkpoint's manifest said
            self.passes = None  # made in the controller: a thread pool does not pickle
            self.running = None

        def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
            # The job's last checkpoint: its pass runs to the end before the controller goes
            # on (and may shut down), so a finished job keeps exactly what the policy says.
            last = metrics[0].get("epoch") == spec.schedule.epochs and "step" not in metrics[0]
            if checkpoint is None or (self.running and not self.running.done() and not last):
                return
            if self.running and last:
                wait([self.running], timeout=LAST_PASS_WAIT_S)
            self.passes = self.passes or ThreadPoolExecutor(1, "wrn-retention")
            run_folder = checkpoint.path.rstrip("/").rpartition("/")[0]
            self.running = self.passes.submit(
                prune_checkpoints,
                run_folder,
                checkpoint.filesystem,
                policy,
                checkpoint.path,
                protected,
                self.known,
            )
            if last and wait([self.running], timeout=LAST_PASS_WAIT_S).not_done:
                warnings.warn(
                    f"job {spec.name!r}: retiring old checkpoints took over "
                    f"{LAST_PASS_WAIT_S:.0f}s (storage or registry slow); the job goes on and "
                    "the next run of this job name retires what is left",
                    stacklevel=1,
                )

    return Retention()


def build(
    spec: ClassifyJob | DetectJob,
    callbacks: list | None = None,
    context: tracking.RunContext | None = None,
) -> TorchTrainer:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    storage_path, storage_fs = storage.train_storage(spec.checkpoint.storage_url())
    return TorchTrainer(
        train_func,
        train_loop_config={"spec": spec.model_dump(mode="json"), "tracking": context},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            # A range makes the group elastic: it starts with what fits (at least min), shrinks
            # when a node goes, and grows when there is room, each time from the last checkpoint.
            num_workers=(scaling.min_workers, scaling.max_workers)
            if scaling.elastic
            else scaling.max_workers,
            elastic_resize_monitor_interval_s=scaling.resize_check_s,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=spec.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(
                max_failures=spec.checkpoint.max_failures,
                max_preemption_failures=spec.checkpoint.max_preemptions,
            ),
            # Retention is ours (the callback): Ray keeps every checkpoint it registers.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=[*(callbacks or []), retention(spec, context)],
            # Our progress line says per epoch what Ray Train's INFO lines say per report.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def log_final_model(
    spec: ClassifyJob | DetectJob,
    context: tracking.RunContext,
    found: ray.train.Checkpoint,
) -> str:
    """Log the network of a finished run's last checkpoint to the MLflow run that checkpoint
    names (once: a resubmitted finished job logs nothing new); returns that run's id. Done by
    the driver after fit(), so the workers' loop never needs to know whether the run is the
    last one or a search's trial. Raises RegistrationError."""
    try:
        state = checkpoint.read(found)
        run_id = state.get("mlflow_run_id")
        if spec.kind == "detect":
            net, names = from_checkpoint(state), state["categories"]
        else:
            net = build_model(spec.model.arch, state["num_classes"], dropout=spec.model.dropout)
            # The better of the raw weights and their moving average by the promotion metric.
            average = "ema" in state and spec.ships_average(state.get("metrics") or {})
            net.load_state_dict(state["ema"] if average else state["model"])
            names = state["class_names"]
    except (checkpoint.CheckpointError, OSError, KeyError, RuntimeError) as error:
        raise tracking.RegistrationError(
            f"job {spec.name!r} trained, but its last checkpoint {found.path} could not be "
            f"read back to log the model ({type(error).__name__}: {error}); the checkpoints "
            "stay as they are"
        ) from None
    if not run_id:
        raise tracking.RegistrationError(
            f"job {spec.name!r}: its checkpoint {found.path} names no MLflow run; the weights "
            "are there, but no model was logged"
        )
    if spec.kind == "detect":
        options = state["detector"]

        def log(client, run: str):
            return tracking.log_detector(client, run, net, names, options)
    else:

        def log(client, run: str):
            return tracking.log_classifier(client, run, spec, net, names, spec.eval_size)

    tracking.log_trained_model(spec, context, run_id, found.path, log)
    return run_id
