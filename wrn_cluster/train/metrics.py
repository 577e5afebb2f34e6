"""Metric names, the epoch's sums of a step's stats, and the progress lines (one per epoch,
one per step checkpoint, and rank 0's every few seconds inside an epoch).

A step returns its batch's stats as one tensor on the device, in the order of its task's
``SUMS`` names; ``Sums`` adds them up and reads them back once per epoch, by name.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from wrn_cluster.spec.datasets import COCO_AP_METRICS
from wrn_cluster.spec.sections import lower_is_better

# torchvision's Faster R-CNN losses, each summed over the epoch's images by the detection step.
DETECTION_LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")

# What each task's step sums per batch, in the order of its stats tensor.
CLASSIFY_SUMS = ("loss_sum", "correct", "counted", "skipped")
DETECT_SUMS = ("loss_sum", *(f"{name}_sum" for name in DETECTION_LOSSES), "images", "skipped")

# What an epoch of each task reports on validation, in the progress line's order.
CLASSIFY_VAL = ("val_loss", "val_top1", "val_top5")
COCO_AP = COCO_AP_METRICS


class Sums:
    """One epoch's running sums of a step's stats, kept on the device until read."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.total: torch.Tensor | None = None

    def add(self, stats: torch.Tensor) -> None:
        self.total = stats if self.total is None else self.total + stats

    def read(self, world: int) -> dict[str, float]:
        """The sums over every rank, by name (one collective and one read back)."""
        if self.total is None:
            raise RuntimeError("the training loader gave no batches; the dataset is empty")
        if world > 1:
            dist.all_reduce(self.total)
        return dict(zip(self.names, self.total.tolist(), strict=True))


def train_metrics(kind: str, sums: dict[str, float], train_time_s: float) -> dict[str, float]:
    """The epoch's training metrics from its sums: mean losses, top-1, throughput, skips."""
    if kind == "detect":
        images = sums["images"]
        seen = max(images, 1.0)
        found = {"train_loss": sums["loss_sum"] / seen}
        found |= {f"train_{name}": sums[f"{name}_sum"] / seen for name in DETECTION_LOSSES}
    else:
        images = sums["counted"] + sums["skipped"]
        seen = max(sums["counted"], 1.0)
        found = {"train_loss": sums["loss_sum"] / seen, "train_top1": sums["correct"] / seen}
    return {**found, "images_per_sec": images / train_time_s, "skipped_train": sums["skipped"]}


def epoch_metrics(
    epoch: int,
    train: dict[str, float],
    val: dict[str, Any],
    lr: float,
    epoch_time_s: float,
    elapsed_s: float,
) -> dict[str, Any]:
    """What one epoch reports to Ray Train and MLflow (``epoch`` is 0-based; 1-based out)."""
    val = dict(val)
    skipped = train.pop("skipped_train") + val.pop("skipped_images")
    return {
        "epoch": epoch + 1,
        **train,
        **val,
        "lr": lr,
        "skipped_images": int(skipped),
        "epoch_time_s": epoch_time_s,
        "elapsed_s": elapsed_s,
    }


def step_metrics(
    epoch: int, step: int, samples_in_epoch: int, loss: float, lr: float, elapsed_s: float
) -> dict[str, Any]:
    """What a step checkpoint's report holds (``epoch`` 0-based; 1-based out): where in the
    epoch it stands, not the epoch's scores, which only its end has."""
    return {
        "epoch": epoch + 1,
        "step": step,
        "samples_in_epoch": samples_in_epoch,
        "step_train_loss": loss,
        "lr": lr,
        "elapsed_s": elapsed_s,
    }


def resume_line(job_name: str, epochs: int, epoch: int, samples: int, step: int) -> str:
    """A worker's line when the job continues from a checkpoint (``epoch``: epochs done)."""
    if samples:
        return (
            f"[{job_name}] resumed in epoch {epoch + 1}/{epochs} after {samples} samples "
            f"(step {step})"
        )
    return f"[{job_name}] resumed at the start of epoch {epoch + 1}/{epochs} (step {step})"


def resize_line(job_name: str, was: int, now: int, step: int) -> str:
    """A worker's line when an elastic group continues on another number of workers."""
    how = "shrank" if now < was else "grew"
    return f"[{job_name}] {how} from {was} to {now} workers at step {step}"


def progress_line(
    job_name: str, kind: str, epochs: int, m: dict[str, Any], elastic: bool = False
) -> str:
    """The driver's line for one report: an epoch's scores, or where a step checkpoint stands;
    an elastic group's lines end with its current worker count."""
    on = ""
    if elastic and "workers" in m:
        on = f"  {m['workers']} worker{'s' if m['workers'] != 1 else ''}"
    if "samples_in_epoch" in m:
        return (
            f"[{job_name}] epoch {m['epoch']}/{epochs} step {m['step']}: "
            f"{m['samples_in_epoch']} samples in  train loss {m['step_train_loss']:.4f}  "
            f"lr {m['lr']:.4g}{on}"
        )
    if kind == "detect":
        scores = f"train loss {m['train_loss']:.4f}  " + " ".join(
            f"{name} {m[name]:.3f}" for name in COCO_AP
        )
    else:
        scores = (
            f"train loss {m['train_loss']:.4f} top1 {m['train_top1']:.2%}  val loss "
            f"{m['val_loss']:.4f} top1 {m['val_top1']:.2%} top5 {m['val_top5']:.2%}"
        )
    return (
        f"[{job_name}] epoch {m['epoch']}/{epochs}  {scores}  lr {m['lr']:.4g}  "
        f"{m['images_per_sec']:.0f} img/s  {m['epoch_time_s']:.1f}s{on}"
    )


class InEpoch:
    """Rank 0's sign of life inside a long epoch: every ``every_s`` seconds a line with the
    step, the loss, the images per second since the epoch (or the resume) started, and the
    time left in the epoch and in the job at that pace (evaluation not counted)."""

    def __init__(
        self, job_name: str, epochs: int, steps_per_epoch: int, batch: int, every_s: float
    ) -> None:
        self.job_name, self.epochs, self.steps_per_epoch = job_name, epochs, steps_per_epoch
        self.batch, self.every_s = batch, every_s
        self.started = self.last = time.perf_counter()
        self.first_step = 0

    def start_epoch(self, done: int) -> None:
        """``done``: the optimizer steps the job had taken when this epoch's steps began."""
        self.started = self.last = time.perf_counter()
        self.first_step = done

    def due(self) -> bool:
        return self.every_s > 0 and time.perf_counter() - self.last >= self.every_s

    def line(self, epoch: int, done: int, loss: float) -> str:
        """The line at optimizer step ``done`` of the job (``epoch`` 0-based)."""
        now = time.perf_counter()
        self.last = now
        steps = max(done - self.first_step, 1)
        per_step = (now - self.started) / steps
        in_epoch = done - epoch * self.steps_per_epoch
        left_epoch = (self.steps_per_epoch - in_epoch) * per_step
        left_job = left_epoch + (self.epochs - epoch - 1) * self.steps_per_epoch * per_step
        return (
            f"[{self.job_name}] epoch {epoch + 1}/{self.epochs} step {in_epoch}/"
            f"{self.steps_per_epoch} ({in_epoch / self.steps_per_epoch:.0%})  loss {loss:.4f}  "
            f"{self.batch / per_step:.0f} img/s  ETA epoch {duration(left_epoch)}, "
            f"job {duration(left_job)}"
        )

    def evaluating(self, loader, epoch: int):
        """``loader``'s batches, with a line every ``every_s`` seconds while evaluation of
        ``epoch`` (0-based) runs: the batch, the share done and the time left."""
        total = len(loader)
        started = self.last = time.perf_counter()
        for i, batch in enumerate(loader, start=1):
            yield batch
            if self.due():
                now = self.last = time.perf_counter()
                left = (total - i) * (now - started) / i
                print(
                    f"[{self.job_name}] epoch {epoch + 1}/{self.epochs} evaluating batch "
                    f"{i}/{total} ({i / total:.0%})  ETA {duration(left)}",
                    flush=True,
                )


def duration(seconds: float) -> str:
    """3h 05m, 4m 12s, 9s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class Target:
    """``schedule.stop_at``: whether an epoch's report reaches it (a loss at or below the value,
    any other metric at or above it), and the time and device-hours recorded when one does."""

    def __init__(self, stop_at: dict[str, float] | None, keys: tuple[str, str] | None) -> None:
        ((self.metric, self.value),) = (stop_at or {None: 0.0}).items()
        self.keys = keys

    def reached(self, report: dict[str, Any]) -> bool:
        found = report.get(self.metric) if self.metric else None
        if not isinstance(found, int | float):
            return False
        return found <= self.value if lower_is_better(self.metric) else found >= self.value

    def record(self, elapsed_s: float, device_hours: float) -> dict[str, float]:
        time_key, hours_key = self.keys or ("", "")
        return {time_key: elapsed_s, hours_key: device_hours}

    def line(self, job_name: str, epoch: int, elapsed_s: float, device_hours: float) -> str:
        return (
            f"[{job_name}] reached {self.metric} {self.value:g} at epoch {epoch + 1} in "
            f"{duration(elapsed_s)} ({device_hours:.3g} device-hours): stopping"
        )
