"""What a checkpoint holds, so that a resumed run continues exactly where it stopped, and how
a checkpoint proves it is complete.

``training_state`` and ``restore`` own the state's keys: the network, optimizer, schedule and
scaler, the epoch and step, every rank's random streams, the data order (with, for a checkpoint
taken inside an epoch, the samples of that epoch already trained), the resumes so far, the
MLflow run, the report's metrics, and what the task adds (class names, COCO categories).

``save`` writes the state, then a manifest of every file's size and SHA-256, last: a checkpoint
without a manifest, or whose files differ from it, was cut short or damaged, and ``load`` refuses
it. ``load_latest`` resumes from Ray's latest checkpoint or, if that one is broken, from the
newest complete one before it. States load with ``torch.load(weights_only=True)`` only: a
checkpoint that needs arbitrary pickle (and could run code) is refused.

``upload`` copies a checkpoint to the job's storage file by file, the manifest last, retrying
with exponential backoff while the store is unreachable; if it stays down the job stops with
``CheckpointUploadError`` and the checkpoints already stored stay as they were.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from wrn_cluster.data.storage import filesystem, join
from wrn_cluster.train.ema import WeightAverage

if TYPE_CHECKING:
    import pyarrow.fs
    import ray.train

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
RETIRED_FILE = "RETIRED.txt"
START_FRESH = "use another job name or checkpoint.storage to start fresh"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which and what to do."""


class CorruptCheckpointError(CheckpointError):
    """A partial or damaged checkpoint: no manifest, or files that differ from it."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would need arbitrary pickle (code from the file) to load."""


class CheckpointUploadError(CheckpointError):
    """The checkpoint storage stayed unreachable through every upload attempt."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint written for another network than the one the spec asks for."""


def rng_state() -> dict[str, Any]:
    """This process's random streams as plain Python values (bytes, ints), which both
    torch.distributed's object gather and torch.load(weights_only=True) accept."""
    kind, keys, *rest = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), *rest),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_byte_tensor(state["torch"]))
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


@dataclass
class Training:
    """What an optimizer step changes, as the loop holds it; the network may be DDP-wrapped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: WeightAverage | None = None  # the spec's ema: the weights' moving average

    def network(self) -> nn.Module:
        return getattr(self.model, "module", self.model)


@dataclass
class Resumed:
    """Where a job stands when its workers start: 0 and no run for a fresh one. ``epoch`` is
    the epochs finished; ``samples_in_epoch`` those of the next epoch already trained (a step
    checkpoint's; 0 after an epoch's end)."""

    epoch: int = 0
    samples_in_epoch: int = 0
    data_order: dict[str, Any] = field(default_factory=dict)  # what fixed the order (order.py)
    resumes: list[int] = field(default_factory=list)
    mlflow_run_id: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # the checkpoint's report

    @property
    def elapsed_s(self) -> float:
        """The job's wall time up to the checkpoint, over its earlier attempts."""
        return float(self.metrics.get("elapsed_s", 0.0))

    @property
    def device_hours(self) -> float:
        return float(self.metrics.get("device_hours", 0.0))


def restore(
    found: ray.train.Checkpoint | None,
    training: Training,
    arch: str,
    num_classes: int,
    rank: int,
) -> Resumed:
    """Load the job's latest complete checkpoint (if any) into ``training`` and this rank's
    random streams; every rank loads the same weights, so DDP's copies agree. A rank the
    writing run did not have (the job came back with more workers) keeps its own streams."""
    if found is None:
        return Resumed()
    state = load_latest(found, arch, num_classes)
    training.network().load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scheduler.load_state_dict(state["scheduler"])
    training.scaler.load_state_dict(state["scaler"])
    if training.ema is not None:  # a checkpoint from before ema was on starts it afresh
        if "ema" in state:
            training.ema.load(state["ema"], int(state.get("ema_updates", 1)))
        else:
            training.ema.start_from(training.network())
    if rank < len(state["rng"]):
        set_rng_state(state["rng"][rank])
    return Resumed(
        epoch=state["epoch"],
        samples_in_epoch=int(state.get("data_order", {}).get("samples_in_epoch", 0)),
        data_order=dict(state.get("data_order", {})),
        resumes=[*state["resumes"], state["epoch"]],
        mlflow_run_id=state.get("mlflow_run_id"),
        metrics=dict(state.get("metrics") or {}),
    )


def is_due(epoch: int, epochs: int, every_epochs: int) -> bool:
    """Whether the 0-based ``epoch`` ends with a checkpoint: every N epochs, and the last."""
    return epoch + 1 == epochs or (epoch + 1) % every_epochs == 0


def gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's random streams (a collective: all ranks call it), so each resumes its own."""
    if world == 1:
        return [rng_state()]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def training_state(
    training: Training,
    *,
    arch: str,
    num_classes: int,
    epoch: int,
    seed: int,
    rng: list[dict[str, Any]],
    resumed: Resumed,
    metrics: dict[str, Any],
    extra: dict[str, Any],
    samples_in_epoch: int = 0,
    order_facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a resume needs, plus the task's ``extra``: after the 0-based ``epoch``, or,
    with ``samples_in_epoch``, after that many samples of it (a step checkpoint). The keys are
    those older versions wrote; one of them reads a step checkpoint as its epoch's start."""
    done = epoch if samples_in_epoch else epoch + 1
    order = {"seed": seed, "next_epoch": done, **(order_facts or {})}
    if samples_in_epoch:
        order["samples_in_epoch"] = samples_in_epoch
    return {
        "arch": arch,
        "num_classes": num_classes,
        "model": training.network().state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "scaler": training.scaler.state_dict(),
        "epoch": done,
        "step": training.scheduler.last_epoch,
        "rng": rng,
        "data_order": order,
        "resumes": resumed.resumes,
        "mlflow_run_id": resumed.mlflow_run_id,
        "metrics": metrics,
        **(
            {"ema": training.ema.state_dict(), "ema_updates": training.ema.updates}
            if training.ema is not None
            else {}
        ),
        **extra,
    }


def read(found: ray.train.Checkpoint) -> dict[str, Any]:
    """A finished job's checkpoint state, verified; e.g. to log its network after fit()."""
    with found.as_directory() as directory:
        verify(directory)
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def upload_to_run(attempts: int, backoff_s: float):
    """A ``checkpoint_upload_fn`` for ``ray.train.report``: stores the checkpoint in the Train
    run's folder through ``upload``, with its retries, instead of Ray's single attempt."""
    import ray.train

    def upload_fn(local: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
        storage = ray.train.get_context().get_storage()
        storage_validated(storage)
        destination = storage.build_checkpoint_path_from_name(name)
        upload(local.path, storage.storage_filesystem, destination, attempts, backoff_s)
        return ray.train.Checkpoint(destination, storage.storage_filesystem)

    return upload_fn


class UploadsInFlight:
    """Rank 0's count of the checkpoints it handed to Ray Train's background upload that have
    not finished uploading (Ray uploads them one at a time, in order)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def busy(self) -> bool:
        with self._lock:
            return self._count > 0

    def track(self, upload_fn: Any) -> Any:
        """``upload_fn`` counted: call the result for one checkpoint handed over."""
        with self._lock:
            self._count += 1

        def counted(local: Any, name: str) -> Any:
            try:
                return upload_fn(local, name)
            finally:
                with self._lock:
                    self._count -= 1

        return counted


def storage_validated(storage: Any) -> None:
    """Ray Train's check before its own checkpoint upload (its StorageContext's private
    ``_check_validation_file``, pinned by a test): a local storage path that exists only on
    the head node, without the marker Ray wrote there, is an error, not a silently local copy."""
    storage._check_validation_file()


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write the state, then the manifest (last, so that its presence means 'complete')."""
    path = Path(directory) / STATE_FILE
    torch.save(state, path)
    write_manifest(directory, {"step": state.get("step"), **(state.get("metrics") or {})})
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path, metrics: dict[str, Any] | None = None) -> None:
    """Sizes and SHA-256 of every file in the checkpoint folder, and the numbers among the
    ``metrics`` it was reported with (what retention ranks by), written atomically."""
    directory = Path(directory)
    files = {
        item.relative_to(directory).as_posix(): {
            "size": item.stat().st_size,
            "sha256": _sha256(item),
        }
        for item in sorted(directory.rglob("*"))
        if item.is_file() and item.name not in (MANIFEST_FILE, f"{MANIFEST_FILE}.tmp")
    }
    scratch = directory / f"{MANIFEST_FILE}.tmp"
    numbers = {
        k: v
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    manifest = {"format": MANIFEST_FORMAT, "files": files, "metrics": numbers}
    scratch.write_text(json.dumps(manifest, indent=1))
    os.replace(scratch, directory / MANIFEST_FILE)


def verify(directory: str | Path) -> None:
    """Raise CorruptCheckpointError unless every file the manifest lists is there, whole."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        files = manifest["files"]
        listed = {name: (int(f["size"]), str(f["sha256"])) for name, f in files.items()}
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{directory}: no {MANIFEST_FILE}; the checkpoint was not completely written "
            "(the manifest is written last)"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CorruptCheckpointError(
            f"{directory}: {MANIFEST_FILE} is damaged ({type(error).__name__}: {error})"
        ) from None
    if STATE_FILE not in listed:
        raise CorruptCheckpointError(f"{directory}: {MANIFEST_FILE} does not list {STATE_FILE}")
    for name, (size, sha256) in listed.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{directory}: {name} is missing; the manifest lists it")
        if path.stat().st_size != size:
            raise CorruptCheckpointError(
                f"{directory}: {name} holds {path.stat().st_size} bytes, the manifest says "
                f"{size}; it was cut short or overwritten"
            )
        if _sha256(path) != sha256:
            raise CorruptCheckpointError(
                f"{directory}: {name} does not match its SHA-256 in the manifest; it is damaged"
            )


def load(directory: str | Path, arch: str, num_classes: int) -> dict[str, Any]:
    """Read a verified checkpoint with weights_only=True, refusing one that is partial or
    damaged, one that needs arbitrary pickle, and one made for another network."""
    verify(directory)
    path = Path(directory) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        holds = f" (it holds a {found.group(1)})" if found else ""
        raise UnsafeCheckpointError(
            f"{path} needs arbitrary pickle to load{holds}; wrn-cluster loads checkpoints with "
            "torch.load(weights_only=True) and never runs code from one: save tensors and plain "
            f"Python values only, or {START_FRESH}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CorruptCheckpointError(
            f"{path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from None
    if not isinstance(state, dict) or "arch" not in state or "num_classes" not in state:
        raise CorruptCheckpointError(f"{path} is not a wrn-cluster training state")
    if (state["arch"], state["num_classes"]) != (arch, num_classes):
        raise CheckpointMismatchError(
            f"the checkpoint in {directory} holds {state['arch']} with {state['num_classes']} "
            f"classes, but the spec asks for {arch} with {num_classes}; {START_FRESH}"
        )
    return state


def load_latest(found: ray.train.Checkpoint, arch: str, num_classes: int) -> dict[str, Any]:
    """The state of Ray's latest checkpoint; if it is partial or damaged, that of the newest
    complete checkpoint before it in the same run folder, with a warning."""
    try:
        with found.as_directory() as directory:
            return load(directory, arch, num_classes)
    except CorruptCheckpointError as error:
        broken = error
    for older in _older_checkpoints(found):
        try:
            with older.as_directory() as directory:
                state = load(directory, arch, num_classes)
        except CorruptCheckpointError:
            continue
        warnings.warn(
            f"the latest checkpoint is unusable ({broken}); resuming from the one before it, "
            f"{older.path} (epoch {state.get('epoch')})",
            stacklevel=2,
        )
        return state
    run_folder = found.path.rstrip("/").rsplit("/", 1)[0]
    raise CorruptCheckpointError(
        f"{broken}; no complete checkpoint precedes it in {run_folder}; delete that folder "
        f"or {START_FRESH}"
    )


def _older_checkpoints(found: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The checkpoint_* folders next to ``found`` that sort before it (Ray names them by
    time), newest first, listed through the checkpoint's own filesystem (local, S3, ...)."""
    import pyarrow.fs
    from ray.train import Checkpoint

    run_folder, _, name = found.path.rstrip("/").rpartition("/")
    entries = found.filesystem.get_file_info(pyarrow.fs.FileSelector(run_folder))
    older = sorted(
        (
            entry.base_name
            for entry in entries
            if entry.type == pyarrow.fs.FileType.Directory
            and entry.base_name.startswith("checkpoint_")
            and entry.base_name < name
        ),
        reverse=True,
    )
    return [Checkpoint(f"{run_folder}/{base}", found.filesystem) for base in older]


class Stored(NamedTuple):
    """What retention reads of a complete checkpoint from its manifest."""

    step: int  # optimizer steps trained: what "newest" means (folder names hold a node's clock)
    score: float | None  # the promotion metric; None for a step checkpoint, or not finite


def retained(
    stored: dict[str, Stored],
    keep: int,
    keep_best: int,
    lower_is_better: bool,
    protected: set[str],
) -> set[str]:
    """Of complete checkpoints by path, the ones to keep: the newest ``keep`` (most steps; of
    equal steps the later name), the best ``keep_best`` by score (of equal scores the newer),
    and every ``protected`` one."""
    newest = sorted(stored, key=lambda path: (stored[path].step, path), reverse=True)
    scored = [path for path in newest if stored[path].score is not None]
    scored.sort(key=lambda path: stored[path].score * (1 if lower_is_better else -1))
    return set(newest[:keep]) | set(scored[:keep_best]) | (protected & set(stored))


def read_stored(fs: pyarrow.fs.FileSystem, path: str, metric: str) -> Stored | None:
    """A checkpoint's step and promotion metric from its manifest; None without one (an upload
    under way or cut short, or a retired checkpoint)."""
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST_FILE}") as stream:
            numbers = json.loads(stream.read()).get("metrics", {})
    except (FileNotFoundError, ValueError):
        return None
    score, step = numbers.get(metric), numbers.get("step")
    finite = isinstance(score, int | float) and math.isfinite(score)
    return Stored(step if isinstance(step, int) else -1, float(score) if finite else None)


def prune(
    run_folder: str,
    fs: pyarrow.fs.FileSystem,
    policy: tuple[int, int, str],
    current: str,
    protected: Callable[[], set[str]],
    known: dict[str, Stored] | None = None,
) -> list[str]:
    """Retire (see ``retire``) the complete checkpoints in ``run_folder`` that ``retained``
    does not keep under ``policy`` (keep, keep_best, promotion metric); returns their paths.
    ``current``, the checkpoint just reported, always stays. ``protected()`` (paths of
    checkpoints registered model versions were made from) is asked only when something would
    go. ``known`` caches what manifests said (they never change). A storage or registry error
    retires nothing this time, with a warning: retention must never stop the training."""
    import pyarrow.fs

    keep, keep_best, metric = policy
    known = {} if known is None else known
    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(run_folder))
        stored = {}
        for entry in entries:
            name = entry.base_name
            if entry.type != pyarrow.fs.FileType.Directory or not name.startswith("checkpoint_"):
                continue
            found = known.get(entry.path) or read_stored(fs, entry.path, metric)
            if found is not None:
                stored[entry.path] = known[entry.path] = found
        lower_is_better = metric.endswith("loss")
        pinned = {current.rstrip("/")}
        if not set(stored) - retained(stored, keep, keep_best, lower_is_better, pinned):
            return []
        kept = retained(stored, keep, keep_best, lower_is_better, pinned | protected())
        going = sorted(set(stored) - kept)
        for path in going:
            retire(fs, path)
            known.pop(path, None)
    except Exception as error:  # storage or registry: keep everything for now
        warnings.warn(
            f"not retiring old checkpoints in {run_folder} this time ({type(error).__name__}: "
            f"{error}); checkpoint.keep and keep_best apply again after the next checkpoint",
            stacklevel=2,
        )
        return []
    return going


def retire(fs: pyarrow.fs.FileSystem, path: str) -> None:
    """Delete a checkpoint's files but leave its folder, holding only RETIRED_FILE: Ray Train
    refuses to restore a run whose record names a checkpoint folder that is gone
    (CheckpointManagerInitializationError), and lists every checkpoint it registered. With no
    manifest left, nothing here resumes from it. The note is written first and the manifest
    deleted next, so a pass cut short at any point leaves a folder that exists and that no
    resume takes."""
    import pyarrow.fs

    with fs.open_output_stream(f"{path}/{RETIRED_FILE}") as stream:
        stream.write(
            b"The weights of this checkpoint were deleted by checkpoint.keep / keep_best; "
            b"the folder stays because Ray Train's record of the run names it.\n"
        )
    fs.delete_file(f"{path}/{MANIFEST_FILE}")
    for entry in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True)):
        if entry.type == pyarrow.fs.FileType.File and entry.base_name != RETIRED_FILE:
            fs.delete_file(entry.path)


def upload(
    source: str | Path,
    filesystem: pyarrow.fs.FileSystem,
    destination: str,
    attempts: int,
    backoff_s: float,
    max_backoff_s: float = 60.0,
) -> None:
    """Copy the checkpoint folder ``source`` to ``destination`` on ``filesystem`` (Ray Train's
    storage), the manifest last so that a cut-short upload reads as incomplete. An attempt that
    fails with a storage error is repeated whole after ``backoff_s``, doubling up to
    ``max_backoff_s``; after ``attempts`` failures, CheckpointUploadError."""
    source = Path(source)
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    files.append(source / MANIFEST_FILE)
    wait, started = backoff_s, time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            filesystem.create_dir(destination)
            for path in files:
                target = f"{destination}/{path.relative_to(source).as_posix()}"
                with open(path, "rb") as local, filesystem.open_output_stream(target) as remote:
                    shutil.copyfileobj(local, remote, 8 << 20)
            return
        except OSError as error:  # pyarrow's storage errors are OSErrors
            cause = _storage_cause(error)
            if attempt == attempts:
                raise CheckpointUploadError(
                    f"could not write the checkpoint to {destination}: {attempts} attempts over "
                    f"{time.monotonic() - started:.0f}s failed, the last with: {cause}; the "
                    "checkpoints already stored are untouched; once the storage answers again "
                    "(check checkpoint.storage and the S3 endpoint and credentials), submit the "
                    "same job name to resume from the last of them"
                ) from None
            warnings.warn(
                f"checkpoint upload to {destination} failed (attempt {attempt} of {attempts}: "
                f"{cause}); retrying in {wait:g}s",
                stacklevel=2,
            )
            time.sleep(wait)
            wait = min(wait * 2, max_backoff_s)


def _storage_cause(error: OSError) -> str:
    """The gist of a storage error, without the AWS SDK's retryable-error tokens, which would make
    Ray Train repeat a failure that our own retries already gave up on."""
    text = " ".join(str(error).split())
    return re.sub(r"AWS Error ([A-Z_]+)", lambda m: m.group(1).lower().replace("_", " "), text)


def weights_path(url: str) -> tuple[Any, str]:
    """(filesystem, state file) for a checkpoint URL: a state.pt, a checkpoint folder, or a
    job's run folder, meaning its newest checkpoint (Ray names them checkpoint_<time>)."""
    fs, path = filesystem(url)
    if path.endswith(".pt") or fs.isfile(join(path, STATE_FILE)):
        return fs, path if path.endswith(".pt") else join(path, STATE_FILE)
    found = sorted(fs.glob(join(path, "checkpoint_*", STATE_FILE)))
    if not found:
        raise FileNotFoundError(
            f"{url}: no {STATE_FILE} there, nor checkpoint_*/{STATE_FILE} of a job's run folder"
        )
    return fs, found[-1]


def read_weights(url: str, arch: str) -> dict[str, torch.Tensor]:
    """The network weights of a wrn-cluster checkpoint at ``url`` (see ``weights_path``; any
    fsspec URL), refusing one made for another network; e.g. to start a detector's backbone
    from a classifier."""
    fs, path = weights_path(url)
    with fs.open(path, "rb") as handle:
        state = torch.load(handle, map_location="cpu", weights_only=True)
    if state.get("arch") != arch:
        raise CheckpointMismatchError(
            f"{url} holds a {state.get('arch')} checkpoint, but model.arch is {arch}; point "
            "model.backbone_weights at a checkpoint of the same network"
        )
    return state["model"]
