"""Preflight: what would stop a job, checked in seconds before any worker starts.

``check(spec)`` is what every submit runs after the data check (``driver.prepare``): the
checkpoint storage takes a write, the tracking server answers, the registered model name is
usable. ``dry_run(spec, address)`` runs all of it without writing data or starting workers and
returns the plan that ``wrn-cluster submit --dry-run`` prints. Nothing here imports ray at module
level, and mlflow is reached only through tracking.
"""

from __future__ import annotations

import math
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from wrn_cluster import cluster, data, tracking
from wrn_cluster.data import storage
from wrn_cluster.models import build_model
from wrn_cluster.spec import ClassifyJob, DetectJob, JobBase, TuneJob
from wrn_cluster.spec.datasets import DATASET_FACTS
from wrn_cluster.train import precision
from wrn_cluster.train.optim import effective_lr

Spec = ClassifyJob | DetectJob | TuneJob
# Each remote check gives up after this long: a preflight that hangs would defeat its purpose.
TIMEOUT_S = 5.0
S3_HINT = (
    "for s3:// check AWS_ENDPOINT_URL_S3 and the credentials in the environment "
    "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
)


class PreflightError(Exception):
    """One or more settings that would stop the job; each message names the setting and fix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Report:
    """What a dry run found: (check, result) rows and the (item, value) rows of the plan."""

    checks: list[tuple[str, str]] = field(default_factory=list)
    plan: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the job runs, but not as it should


def check(spec: Spec) -> None:
    """Storage, tracking server and model name; raise PreflightError listing every problem."""
    report = Report()
    _check_services(spec, report)
    if report.problems:
        raise PreflightError(report.problems)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def dry_run(spec: Spec, address: str | None) -> Report:
    """Every check, nothing written but a deleted marker; raise PreflightError if any fails."""
    report = Report()
    train_images = _check_data(spec, report)
    _check_services(spec, report)
    _check_resources(spec, address, report)
    if report.problems:
        raise PreflightError(report.problems)
    report.plan = plan(spec, address, train_images)
    return report


# ---------------------------------------------------------------------------------------------
# The checks: each adds a row, and a problem when it fails


def _check_data(spec: Spec, report: Report) -> int | None:
    url = spec.data.url
    try:
        found = data.prepare(spec, write=False)
    except data.DataError as error:
        report.problems.append(str(error))
        return None
    if found.synthetic:
        synth = spec.data.synthesize
        what = (
            f"synthetic COCO shapes ({synth.images} images, {synth.size}px)"
            if isinstance(spec, DetectJob)
            else f"synthetic JPEGs ({synth.classes} classes x {synth.per_class} images, "
            f"{synth.size}px)"
        )
        report.checks.append(
            (
                "data",
                f"{url}: missing or empty; the submit writes {what} there; nothing written now",
            )
        )
    else:
        counted = f", {found.train_images} training images" if found.train_images else ""
        packed = (
            " in shards (manifest and every shard's size checked)"
            if getattr(spec.data, "format", "files") == "shards"
            else ""
        )
        report.checks.append(("data", f"{url}: {spec.data.dataset}{packed}{counted}"))
    return found.train_images


def _check_services(spec: Spec, report: Report) -> None:
    for run in (_check_storage, _check_tracking, _check_model_name, _check_precision):
        run(spec, report)


def _check_precision(spec: Spec, report: Report) -> None:
    warning = precision.emulated_bf16_warning(spec.precision.dtype, spec.scaling.use_gpu)
    if warning:
        report.warnings.append(warning)


def _check_storage(spec: Spec, report: Report) -> None:
    """Write, read back and delete a marker where the job's checkpoints will go."""
    url = spec.checkpoint.storage_url()
    setting = "checkpoint.storage" + ("" if spec.checkpoint.storage else " (unset)")
    try:
        fs, root = storage.filesystem(url, TIMEOUT_S)
        folder = storage.join(root, spec.name)
        marker = storage.join(folder, f".wrn-cluster-preflight-{uuid.uuid4().hex}")
        payload = f"wrn-cluster preflight of job {spec.name}\n".encode()
        created = _make_folder(fs, folder)
        try:
            fs.pipe_file(marker, payload)
            back = fs.cat_file(marker)
            fs.rm_file(marker)
        finally:
            _remove_folders(fs, created)
    except Exception as error:  # any store, transport or permission error is the finding
        report.problems.append(_storage_problem(setting, url, error))
        return
    if back != payload:
        report.problems.append(
            f"{setting}: {url} returned other bytes than were written; point it at a "
            "consistent store"
        )
        return
    report.checks.append(("checkpoint storage", f"{url}: writable (marker written, read, deleted)"))


def _make_folder(fs, folder: str) -> list[str]:
    """Folders exist only on local-like filesystems; create them, return the ones created."""
    if "s3" in fs.protocol or "s3a" in fs.protocol:
        return []  # object stores have no folders (and s3fs's makedirs would create a bucket)
    missing = []
    path = folder
    while path and not fs.exists(path):
        missing.append(path)
        parent = path.rsplit("/", 1)[0]
        if parent == path:
            break
        path = parent
    fs.makedirs(folder, exist_ok=True)
    return missing


def _remove_folders(fs, created: list[str]) -> None:
    for path in created:  # deepest first; a folder someone else wrote into meanwhile stays
        try:
            fs.rmdir(path)
        except OSError:
            return


def _storage_problem(setting: str, url: str, error: Exception) -> str:
    field = setting.split()[0]
    on_s3 = url.startswith(("s3://", "s3a://"))
    hint = f"; {S3_HINT}" if on_s3 else ""
    if isinstance(error, FileNotFoundError) and on_s3:
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        return (
            f"{setting}: bucket {bucket!r} of {url} does not exist ({_short(error)}); create it "
            f"or set {field} to a bucket that exists{hint}"
        )
    if isinstance(error, PermissionError):
        return (
            f"{setting}: no permission to write to {url} ({_short(error)}); set {field} to a "
            f"folder or bucket this job may write to{hint}"
        )
    return (
        f"{setting}: cannot write a checkpoint to {url} ({_short(error)}); set {field} to a "
        f"folder or bucket this job may write to{hint}"
    )


def _check_tracking(spec: Spec, report: Report) -> None:
    if not spec.tracking.enabled:
        report.checks.append(("tracking", "off (tracking.enabled: false)"))
        return
    uri = tracking.display_uri()
    problem = tracking.check_server(TIMEOUT_S)
    if problem:
        report.problems.append(problem)
    elif tracking.is_server():
        report.checks.append(("tracking", f"{uri}: answers and accepts the credentials"))
    else:
        report.checks.append(("tracking", f"{uri}: embedded store (MLFLOW_TRACKING_URI unset)"))


def _check_model_name(spec: Spec, report: Report) -> None:
    name = spec.tracking.registered_model
    if not spec.tracking.enabled or not name:
        return
    problems = tracking.registry_name_problems(name, spec.tracking.alias)
    report.problems += problems
    if not problems:
        report.checks.append(("registered model", f"{name}@{spec.tracking.alias}: usable"))


def resource_problem(spec: JobBase, have: Mapping[str, float], where: str = "") -> str | None:
    """What the job's workers ask for that ``have`` (a cluster's total resources) lacks."""
    scaling = spec.scaling
    least = scaling.min_workers  # an elastic group starts with its minimum
    asked = {"CPU": least * scaling.cpus_per_worker}
    if scaling.use_gpu:
        asked["GPU"] = least * scaling.gpus_per_worker
    short = {k: v for k, v in asked.items() if v > have.get(k, 0)}
    if not short:
        return None
    wanted = ", ".join(f"{v:g} {k}" for k, v in asked.items())
    exists = ", ".join(f"{have.get(k, 0):g} {k}" for k in asked)
    return (
        f"job {spec.name!r} asks for {wanted} ({least} workers x "
        f"{scaling.cpus_per_worker:g} CPU"
        + (f" + {scaling.gpus_per_worker:g} GPU" if scaling.use_gpu else "")
        + f"), but {where or 'the cluster has'} {exists}; lower "
        "scaling.workers, scaling.cpus_per_worker or scaling.gpus_per_worker, or add nodes"
    )


def _check_resources(spec: Spec, address: str | None, report: Report) -> None:

    if address:
        try:
            have = cluster.cluster_resources(address, TIMEOUT_S)
        except cluster.LaunchError as error:
            report.problems.append(str(error))
            return
        where = f"the cluster at {cluster.dashboard_url(address)} has"
        shown = ", ".join(f"{have.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
    else:
        cpus = cluster.local_cpus()
        have = {"CPU": cpus}
        if spec.scaling.use_gpu:  # Ray counts the GPUs when it starts; no import of it here
            have["GPU"] = math.inf
        where = "the embedded Ray would have"
        shown = f"{cpus} CPU" + (", GPUs as Ray finds them" if spec.scaling.use_gpu else "")
    problem = resource_problem(spec, have, where)
    if problem:
        report.problems.append(problem)
        return
    report.checks.append(("resources", f"{where.removeprefix('the ')} {shown}"))


# ---------------------------------------------------------------------------------------------
# The plan


def plan(spec: Spec, address: str | None, train_images: int | None) -> list[tuple[str, str]]:

    scaling, opt, sched = spec.scaling, spec.optimizer, spec.schedule
    per_worker = spec.worker_batch(scaling.max_workers)
    shares = f"{scaling.workers} workers x {per_worker}"
    if scaling.elastic:
        shares = (
            f"the workers' shares, {spec.worker_batch(scaling.max_workers)}-"
            f"{spec.worker_batch(scaling.min_workers)} each"
        )
    resources = f"{scaling.cpus_per_worker:g} CPU" + (
        f" + {scaling.gpus_per_worker:g} GPU" if scaling.use_gpu else ""
    )
    accumulation = (
        f" x {opt.grad_accum_steps} accumulation steps" if opt.grad_accum_steps > 1 else ""
    )
    lr = effective_lr(spec, spec.data.batch_size)
    scaled = (
        f"optimizer.lr {opt.lr:g} x batch {spec.data.batch_size}/{opt.base_batch_size}, the "
        "linear scaling rule"
        if opt.scale_lr_with_batch
        else "optimizer.lr; not scaled with the batch"
    )
    warmup = f", warmup {sched.warmup_epochs:g} epochs" if sched.warmup_epochs else ""
    if getattr(sched, "warmup_steps", 0):  # detection recipes warm up in optimizer steps
        warmup = f", warmup {sched.warmup_steps} steps"
    saves = sched.epochs // spec.checkpoint.every_epochs + bool(
        sched.epochs % spec.checkpoint.every_epochs
    )
    every = spec.checkpoint.every_epochs
    where = storage.join(spec.checkpoint.storage_url(), spec.name, "checkpoint_*")
    rows = [
        ("job", f"{spec.name} ({spec.kind}, {spec.model.arch})"),
        (
            "runs on",
            f"the cluster at {cluster.dashboard_url(address)}" if address else "an embedded Ray",
        ),
        ("workers", f"{scaling.describe()} x {resources} ({scaling.placement_strategy})"),
        ("batch", f"{spec.data.batch_size} global = {shares}{accumulation}"),
        ("lr", f"{lr:g} ({scaled})"),
        ("epochs", f"{sched.epochs} ({sched.type}{warmup})"),
        ("precision", precision_plan(spec)),
    ]
    if train_images:
        micro_batches = math.ceil(train_images / spec.global_micro_batch())
        steps = math.ceil(micro_batches / opt.grad_accum_steps)  # the same on any worker count
        about = "about " if isinstance(spec, DetectJob) else ""  # batches group by aspect ratio
        rows.append(("steps per epoch", f"{about}{steps} ({train_images} training images)"))
    if isinstance(spec, ClassifyJob):
        rows += [("recipe", line) for line in recipe_plan(spec)]
    if isinstance(spec, TuneJob):
        rows.append(("search", "each trial runs this plan with its own searched values"))
    epochs_part = f"every {'epoch' if every == 1 else f'{every} epochs'} and the last"
    keep = f"newest {min(spec.checkpoint.keep, saves)} kept"
    if spec.checkpoint.every_steps:  # then also inside epochs: their count depends on the data
        saves_part = f"{saves} at epoch ends"
        epochs_part += f", plus every {spec.checkpoint.every_steps} steps inside an epoch"
        keep = f"newest {spec.checkpoint.keep} of both kinds kept"
    else:
        saves_part = f"{saves}"
    upload = "in the background" if spec.checkpoint.upload == "async" else "waited for"
    rows.append(("checkpoints", f"{saves_part} ({epochs_part}; {keep}) in {where}, {upload}"))
    restarts = spec.checkpoint.max_preemptions
    rows.append(
        (
            "preemption",
            f"a drained node's notice (asked every {spec.checkpoint.preemption_check_steps} "
            "steps) checkpoints at once; "
            + (f"{restarts} restarts" if restarts >= 0 else "restarts without limit"),
        )
    )
    if spec.tracking.enabled:
        model = spec.tracking.registered_model
        rows.append(
            (
                "tracking",
                f"{tracking.display_uri()}, experiment {spec.tracking.experiment!r}, "
                + (f"registered model {model}@{spec.tracking.alias}" if model else "no model"),
            )
        )
    else:
        rows.append(("tracking", "off"))
    return rows


def recipe_plan(spec: ClassifyJob) -> list[str]:
    """Each recipe option on, with what it costs a step where that follows from the spec."""
    data, aug, lines = spec.data, spec.data.augmentation, []
    size = spec.image_size
    if aug.policy != "none" or aug.random_erasing:
        chosen = [aug.policy] if aug.policy != "none" else []
        chosen += [f"random erasing p={aug.random_erasing:g}"] if aug.random_erasing else []
        lines.append(
            f"{' + '.join(chosen)} per image, in the loader processes (their CPU time: "
            "`wrn-cluster bench input`)"
        )
    if aug.mixes:
        both = aug.mixup and aug.cutmix
        which = " or ".join(
            [f"mixup alpha {aug.mixup:g}"] * bool(aug.mixup)
            + [f"cutmix alpha {aug.cutmix:g}"] * bool(aug.cutmix)
        )
        switch = f" (cutmix for {aug.mix_switch:.0%} of batches)" if both else ""
        lines.append(f"{which}{switch}: one blend of each batch on the device, soft labels")
    if aug.repeats > 1:
        lines.append(
            f"repeated augmentation x{aug.repeats}: an epoch shows 1/{aug.repeats} of the "
            f"images, {aug.repeats} views each, in one global batch (over the ranks)"
        )
    opt = spec.optimizer
    if opt.label_smoothing or opt.loss != "cross_entropy":
        lines.append(f"loss {opt.loss}, label smoothing {opt.label_smoothing:g}")
    if opt.grad_clip_norm:
        lines.append(f"gradients clipped to norm {opt.grad_clip_norm:g}: one norm per step")
    if spec.ema:
        with torch.device("meta"):  # counts parameters without allocating them
            classes = spec.model.num_classes or DATASET_FACTS[data.dataset].num_classes or 1000
            net = build_model(spec.model.arch, classes)
        numbers = sum(t.numel() for t in [*net.parameters(), *net.buffers()])
        ema = spec.ema
        lines.append(
            f"ema decay {ema.decay:g} every {ema.every_steps} steps: {numbers / 1e6:.1f} M "
            f"numbers averaged, {12 * numbers / ema.every_steps / 1e6:.0f} MB of memory traffic "
            "a step on average (fp32); a second evaluation each epoch (val_*_ema)"
        )
    if data.progressive:
        grow = data.progressive
        lines.append(
            f"progressive resizing {grow.start}->{grow.end} px (epochs {grow.from_epoch}-"
            f"{grow.to_epoch if grow.to_epoch is not None else spec.schedule.epochs}): a step at "
            f"{grow.start} px costs about {(grow.start / size) ** 2:.2f}x one at the loader's "
            f"{size} px"
        )
    if spec.eval_size != size:
        lines.append(
            f"evaluated at {spec.eval_size} px after a {data.eval_resize or '(default)'} resize, "
            f"trained at {size}: an evaluation image costs {(spec.eval_size / size) ** 2:.2f}x"
        )
    if data.eval_flip:
        lines.append("flip test-time augmentation: two forward passes per evaluation image")
    if spec.schedule.stop_at:
        ((metric, value),) = spec.schedule.stop_at.items()
        budget = spec.tracking.max_device_hours
        lines.append(
            f"stops at {metric} {value:g}, recording the time and device-hours to it"
            + (f"; promoted only within {budget:g} device-hours" if budget else "")
        )
    return lines


def precision_plan(spec: Spec) -> str:
    """The dtype and layout the workers will use, and why: for CPU workers as this machine's
    CPU decides (the cluster's CPUs may differ); for GPU workers by CUDA's rules."""
    setting = spec.precision
    if spec.scaling.use_gpu:
        device, chosen = _CUDA, "bf16" if setting.dtype == "auto" else setting.dtype
        why_dtype = "fp16 on GPUs without bf16"
    else:
        device, chosen = _CPU, precision.resolve(setting.dtype, _CPU)
        why_dtype = f"this CPU {'has' if precision.cpu_supports_bf16() else 'has no'} native bf16"
    if setting.dtype != "auto":
        why_dtype = "set in the spec"
    channels_last, why = precision.layout(setting.channels_last, chosen, device)
    layout = "channels_last" if channels_last else "NCHW"
    compiled = "; torch.compile" if setting.compile else ""
    return f"{_dtype_name(chosen)}: {why_dtype}; {layout}: {why}{compiled}"


_CPU, _CUDA = torch.device("cpu"), torch.device("cuda")


def _dtype_name(dtype: str) -> str:
    return "fp32" if dtype == "fp32" else f"{dtype} autocast"


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
