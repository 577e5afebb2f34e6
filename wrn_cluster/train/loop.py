"""The loop each Ray Train worker runs, for classification and detection alike: resume (inside
an epoch, if a step checkpoint left off there), then per epoch the steps (with a report and
checkpoint every ``checkpoint.every_steps``, and one at once when Ray Train says a node is being
preempted), the evaluation, and one report (with a checkpoint when one is due).

Checkpoints upload in the background by default (Ray Train's ASYNC mode, one at a time): the
steps go on while rank 0's checkpoint uploads, and a step checkpoint due while the previous one
is still uploading is skipped rather than queued. A just-in-time checkpoint on a preemption
notice uploads before the loop goes on: it must be stored before the node goes.

What differs by task (datasets, network, loaders, step, evaluation) comes from
``train.classify`` or ``train.detect``; the loop does not know whether a search runs it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import torch

from wrn_cluster import tracking
from wrn_cluster.spec import ClassifyJob, DetectJob
from wrn_cluster.train import checkpoint, classify, detect, metrics, optim, order
from wrn_cluster.train.ema import WeightAverage

# Each task module gives the loop the same pieces: SUMS, parts, step, loaders, evaluate.
TASKS = {"classify": (ClassifyJob, classify), "detect": (DetectJob, detect)}


def train_func(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    job_start = time.perf_counter()
    job_type, task = TASKS[config["spec"]["kind"]]
    spec = job_type.model_validate(config["spec"])
    quiet_ray_train_logs()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    torch.manual_seed(spec.seed * 1009 + rank)

    parts = task.parts(spec, rank, device)
    model = ray.train.torch.prepare_model(parts.model)
    step = task.step(spec, model, device)
    batches, train_loader, val_loader = task.loaders(
        spec, parts.train_set, parts.val_set, rank, world, device
    )
    # The batches' count, not the loader's: a stream of shards pads its epoch (order.py).
    steps_per_epoch = -(-len(batches) // spec.optimizer.grad_accum_steps)
    scheduler = optim.build_scheduler(step.optimizer, spec, steps_per_epoch)
    ema_section = getattr(spec, "ema", None)  # classification's; detection has none
    ema = WeightAverage(parts.model, ema_section) if ema_section else None
    training = checkpoint.Training(model, step.optimizer, scheduler, step.scaler, ema)
    resumed = checkpoint.restore(
        ray.train.get_checkpoint(), training, spec.model.arch, parts.num_classes, rank
    )
    if resumed.samples_in_epoch:
        order.check_resume_order(resumed.data_order, spec, world)
    if resumed.resumes and rank == 0:
        epochs, samples = spec.schedule.epochs, resumed.samples_in_epoch
        line = metrics.resume_line(spec.name, epochs, resumed.epoch, samples, scheduler.last_epoch)
        print(line, flush=True)
    was = resumed.data_order.get("workers", world) if resumed.resumes else world
    if was != world and rank == 0:  # an elastic group lost or gained workers
        print(metrics.resize_line(spec.name, was, world, scheduler.last_epoch), flush=True)
    tracker = None
    if rank == 0 and config.get("tracking"):
        tracker = tracking.RunTracker(spec, config["tracking"], run_id=resumed.mlflow_run_id)
        resumed.mlflow_run_id = tracker.run_id
        if not resumed.resumes and parts.params:
            tracker.log_params(parts.params)
        if not resumed.resumes or was != world:  # the worker count over the run's steps
            tracker.log_metrics({"workers": world}, scheduler.last_epoch)
    upload = checkpoint.upload_to_run(
        spec.checkpoint.upload_attempts, spec.checkpoint.upload_backoff_s
    )
    accum, log_every = spec.optimizer.grad_accum_steps, spec.tracking.log_every_steps
    every_steps = spec.checkpoint.every_steps
    in_background = spec.checkpoint.upload == "async"
    uploading = checkpoint.UploadsInFlight()
    preemption = Preemption(spec.checkpoint.preemption_check_steps)
    target = metrics.Target(spec.schedule.stop_at, spec.schedule.target_keys())
    # Device-hours: wall time x GPUs (x CPU workers without GPUs), over the job's attempts.
    devices = world * (spec.scaling.gpus_per_worker if spec.scaling.use_gpu else 1)

    def elapsed_and_device_hours() -> tuple[float, float]:
        now = time.perf_counter() - job_start
        return resumed.elapsed_s + now, resumed.device_hours + now * devices / 3600

    progress = metrics.InEpoch(
        spec.name,
        spec.schedule.epochs,
        steps_per_epoch,
        spec.data.batch_size,
        spec.tracking.progress_every_s if rank == 0 else 0,
    )

    def report_with_checkpoint(
        report: dict[str, Any], epoch: int, samples: int = 0, wait: bool = False
    ) -> None:
        """Report with a checkpoint (a collective: every rank calls it); rank 0 writes it and,
        unless told to ``wait`` or the spec says sync, hands it to the background upload."""
        rng = checkpoint.gather_rng_states(world)
        if in_background and not wait:
            saved = None
            if rank == 0:  # Ray deletes the folder once it is uploaded
                directory = tempfile.mkdtemp(prefix="wrn-checkpoint-")
                checkpoint.save(directory, state_now(report, epoch, samples, rng))
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(
                report,
                checkpoint=saved,
                checkpoint_upload_fn=uploading.track(upload) if saved else upload,
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            )
            return
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                checkpoint.save(directory, state_now(report, epoch, samples, rng))
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(report, checkpoint=saved, checkpoint_upload_fn=upload)

    def state_now(report: dict[str, Any], epoch: int, samples: int, rng: list) -> dict[str, Any]:
        return checkpoint.training_state(
            training,
            arch=spec.model.arch,
            num_classes=parts.num_classes,
            epoch=epoch,
            samples_in_epoch=samples,
            seed=spec.seed,
            order_facts=order.order_facts(spec, world),
            rng=rng,
            resumed=resumed,
            metrics=report,
            extra=parts.extra_state,
        )

    # A job that stopped at its target resumes as finished.
    first = spec.schedule.epochs if target.reached(resumed.metrics) else resumed.epoch
    for epoch in range(first, spec.schedule.epochs):
        epoch_start = time.perf_counter()
        if spec.kind == "classify":  # progressive resizing's size for this epoch
            step.size = spec.train_size(epoch)
        # A step checkpoint's epoch continues after the micro-batches it had trained.
        skip = 0
        if epoch == resumed.epoch and resumed.samples_in_epoch:
            samples = resumed.samples_in_epoch
            skip = order.micro_batches_done(samples, spec.global_micro_batch())
        batches.set_epoch(epoch, skip)
        parts.train_set.set_epoch(epoch)
        model.train()
        sums = metrics.Sums(task.SUMS)
        progress.start_epoch(scheduler.last_epoch)
        for i, (inputs, targets) in enumerate(train_loader, start=skip):
            last_micro = (i + 1) % accum == 0 or i + 1 == len(batches)
            loss, stats = step(inputs, targets, last_micro, batches.weight(i, len(targets)))
            sums.add(stats)  # stays on the device; read once at the end of the epoch
            if not last_micro:
                continue
            scheduler.step()
            done, lr = scheduler.last_epoch, step.optimizer.param_groups[0]["lr"]
            if ema:
                ema.after_step(done, training.network())
            if tracker and done % log_every == 0:
                tracker.log_metrics({"step_train_loss": loss.item(), "step_lr": lr}, done)
            if progress.due():  # rank 0 only, every tracking.progress_every_s seconds
                print(progress.line(epoch, done, loss.item()), flush=True)
            notice = preemption.asked(done)  # a collective every preemption_check_steps
            step_due = bool(every_steps) and done % every_steps == 0
            # A step checkpoint due while the previous upload runs is skipped (rank 0 knows;
            # the others follow its broadcast), so uploads never pile up behind the steps.
            if step_due and notice is None and in_background:
                step_due = not broadcast(uploading.busy() if rank == 0 else None)
            if (step_due or notice is not None) and i + 1 < len(batches):
                samples = order.samples_done((i + 1) // accum, spec.data.batch_size)
                elapsed, device_hours = elapsed_and_device_hours()
                report = metrics.step_metrics(epoch, done, samples, loss.item(), lr, elapsed)
                report["device_hours"] = device_hours
                report["workers"] = world
                saving = time.perf_counter()
                report_with_checkpoint(report, epoch, samples, wait=notice is not None)
                if notice is not None and rank == 0:
                    print(preemption.line(spec.name, notice, done, saving), flush=True)
            elif notice is not None:  # the epoch's last step: its end checkpoints at once
                preemption.pending = notice
        train = metrics.train_metrics(
            spec.kind, sums.read(world), time.perf_counter() - epoch_start
        )
        val = task.evaluate(model, progress.evaluating(val_loader, epoch), step, parts, rank, world)
        if ema:  # the average evaluated beside the raw weights: val_top1_ema, ...
            averaged = task.evaluate(ema.network, val_loader, step, parts, rank, world)
            val |= {f"{k}_ema": v for k, v in averaged.items() if k.startswith("val_")}
        lr = step.optimizer.param_groups[0]["lr"]
        elapsed, device_hours = elapsed_and_device_hours()
        epoch_time = time.perf_counter() - epoch_start
        report = metrics.epoch_metrics(epoch, train, val, lr, epoch_time, elapsed)
        report["device_hours"] = device_hours
        reached = target.reached(report)
        if reached:  # the first epoch at the target: its time and device-hours are recorded
            report |= target.record(elapsed, device_hours)
        if tracker:
            tracker.log_metrics(report, step=epoch + 1)
        report["workers"] = world  # for the progress line; MLflow has it by optimizer step
        notice, preemption.pending = preemption.pending, None
        if notice is not None:
            saving = time.perf_counter()
            report_with_checkpoint(report, epoch, wait=True)
            if rank == 0:
                print(preemption.line(spec.name, notice, scheduler.last_epoch, saving), flush=True)
        elif reached or checkpoint.is_due(
            epoch, spec.schedule.epochs, spec.checkpoint.every_epochs
        ):
            report_with_checkpoint(report, epoch)
        else:
            ray.train.report(report)
        if reached:
            if rank == 0:
                print(target.line(spec.name, epoch, elapsed, device_hours), flush=True)
            break
    if tracker:
        tracker.close()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (Ray Train's collective; every rank calls it)."""
    import ray.train.collective

    return ray.train.collective.broadcast_from_rank_zero(value)


class Preemption:
    """Ray Train's preemption notices, asked for every ``every_steps`` steps: a node of the
    worker group is being drained (a spot reclaim, a Kubernetes eviction, ``ray drain-node``)
    and goes at a deadline. Each drained node is answered once, with a checkpoint at once."""

    def __init__(self, every_steps: int) -> None:
        self.every_steps = every_steps
        self.answered: set[str] = set()
        self.pending: Any = None  # a notice at an epoch's last step, for the epoch's end

    def asked(self, step: int) -> Any:
        """A new notice (Ray's PreemptionInfo), or None; a collective at every N-th step."""
        import ray.train

        if step % self.every_steps:
            return None
        info = ray.train.get_preemption_info()
        if info is None or set(info.preempted_node_ids) <= self.answered:
            return None
        self.answered.update(info.preempted_node_ids)
        return info

    @staticmethod
    def line(job_name: str, notice: Any, step: int, started: float) -> str:
        took = time.perf_counter() - started
        left = ""
        if notice.deadline_ms is not None:
            left = f", {notice.deadline_ms / 1000 - time.time():.0f}s before its deadline"
        nodes = ", ".join(node[:8] for node in notice.preempted_node_ids)
        return (
            f"[{job_name}] node {nodes} is being preempted: checkpointed at step {step} in "
            f"{took:.1f}s{left}"
        )


def quiet_ray_train_logs() -> None:
    """The driver prints one line per epoch; Ray Train's per-report INFO lines would repeat it.
    Some of its loggers are named after their file's path, not the module."""
    for name in [*logging.root.manager.loggerDict, "ray.train"]:
        if name.startswith("ray.train") or "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
