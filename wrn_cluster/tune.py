"""Width and depth searches: Ray Tune over trials that are each a DDP Ray Train run.

The paper's question, how to spend parameters, asked of the user's data: every trial is a
classify job built from the tune spec's base plus one point of the search space.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from typing import TYPE_CHECKING, Any

from wrn_cluster import data, tracking, trainer
from wrn_cluster.data import storage
from wrn_cluster.models import describe
from wrn_cluster.spec import ARCH_PARTS, TuneJob, arch_candidates, arch_parts, trial_spec
from wrn_cluster.tracking import RunContext

if TYPE_CHECKING:
    import pyarrow.fs
    from ray.tune import ResultGrid


class SearchError(Exception):
    """A search that cannot start; the message names the setting to change."""


def within_budget(spec: TuneJob, num_classes: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """(kept networks with their params and GMACs, skipped networks with the reason)."""

    budget = spec.tune.budget
    kept, skipped = [], []
    for arch in arch_candidates(spec):
        facts = describe(arch, num_classes, spec.image_size)
        reason = None
        if budget and budget.max_params and facts["params"] > budget.max_params:
            reason = f"{facts['params'] / 1e6:.1f}M params > {budget.max_params / 1e6:.1f}M"
        elif budget and budget.max_gmacs and facts["gmacs"] > budget.max_gmacs:
            reason = f"{facts['gmacs']:.3f} GMACs > {budget.max_gmacs:g}"
        if reason:
            skipped.append((arch, reason))
        else:
            kept.append(facts)
    return kept, skipped


def param_space(spec: TuneJob, arches: list[str]) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    random_arch = any(
        spec.tune.space[k].kind == "choice"
        for k in (*ARCH_PARTS, "model.arch")
        if k in spec.tune.space
    )
    if (
        len(arches) > 1
        or "model.arch" in spec.tune.space
        or any(k in spec.tune.space for k in ARCH_PARTS)
    ):
        space["model.arch"] = tune.choice(arches) if random_arch else tune.grid_search(arches)
    for key, dim in spec.tune.space.items():
        if key in (*ARCH_PARTS, "model.arch"):
            continue
        values = dim.values
        space[key] = {
            "grid": lambda v: tune.grid_search(list(v)),
            "choice": lambda v: tune.choice(list(v)),
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1),  # inclusive, as users write it
        }[dim.kind](values)
    return space


def _trial(config: dict[str, Any], spec_json: dict, tracking_context: RunContext | None) -> None:
    """One trial, run by Tune: a TorchTrainer whose per-epoch reports flow back to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = TuneJob.model_validate(spec_json)
    name = f"{spec.name}-{tune.get_context().get_trial_id()}"
    job = trial_spec(spec, config, name)
    context = None
    if tracking_context:
        context = dataclasses.replace(
            tracking_context, extra_params={k: str(v) for k, v in config.items()}
        )
    print(f"[{spec.name}] trial {tune.get_context().get_trial_id()} runs {config}", flush=True)
    trainer.build(job, [TuneReportCallback()], context).fit()


def run(spec: TuneJob, tracking_context: RunContext | None, say=print) -> ResultGrid:
    """Run the search, print the results table, log the sweep, register the best network. A
    search of this name already in the storage is resumed (Tune's restore): its finished trials
    are not run again, and its unfinished ones continue from their checkpoints."""
    from ray import tune

    num_classes = spec.model.num_classes or data.num_classes(spec)
    kept, skipped = within_budget(spec, num_classes)
    for arch, reason in skipped:
        say(f"[{spec.name}] skipped by budget: {arch} ({reason})")
    if not kept:
        raise SearchError(
            f"job {spec.name!r}: tune.budget leaves no network to try; raise "
            "tune.budget.max_params / max_gmacs or search smaller depths and widths"
        )
    facts = {f["name"]: f for f in kept}

    storage_path, storage_fs = storage.train_storage(spec.checkpoint.storage_url())
    path = f"{storage_path.rstrip('/')}/{spec.name}"
    fs = storage_fs or _local_fs()
    restoring = tune.Tuner.can_restore(path, storage_filesystem=storage_fs)
    record = _read_record(fs, path) if restoring else None
    if restoring:
        _same_search(spec, record, f"{spec.checkpoint.storage_url()}/{spec.name}")
    parent = (record or {}).get("parent_run_id") if tracking_context else None
    if tracking_context:
        if not (parent and tracking.reopen_sweep(tracking_context, parent)):
            parent = tracking.open_sweep(spec, tracking_context)
        tracking_context = dataclasses.replace(tracking_context, parent_run_id=parent)
    _write_record(fs, path, {"spec": _as_recorded(spec), "parent_run_id": parent})
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial, spec_json=spec.model_dump(mode="json"), tracking_context=tracking_context
        ),
        # The trial only waits on its TorchTrainer, whose workers hold the CPUs; Tune refuses
        # an empty request, so it asks for a sliver.
        {"CPU": 0.01},
    )
    if restoring:
        say(
            f"[{spec.name}] resuming the search stored at {spec.checkpoint.storage_url()}/"
            f"{spec.name}: {_finished_trials(path, fs)} trial(s) finished and are not run "
            "again; the others continue from their last checkpoints"
        )
        # Errored trials resume too: a resubmit is how a user retries after fixing the cause.
        tuner = tune.Tuner.restore(
            path, trainable, resume_errored=True, storage_filesystem=storage_fs
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec, list(facts)),
            tune_config=_tune_config(spec),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=spec.tune.max_failures),
                verbose=0,
            ),
        )
    try:
        results = tuner.fit()
    except BaseException:
        if parent:
            tracking.end_run(tracking_context, parent, "FAILED")
        raise
    rows = results_table(spec, results, facts)
    say(format_table(rows))
    if parent:
        try:
            log_best_model(spec, tracking_context, results, rows, storage_fs)
        except tracking.RegistrationError:
            tracking.end_run(tracking_context, parent, "FINISHED")  # the trials ran
            raise
        tracking.finish_sweep(spec, tracking_context, parent, rows, to_csv(rows), plot(rows))
    return results


# Beside Tune's own state in the search's folder: the spec it started with and its MLflow run.
RECORD_FILE = "wrn_cluster_search.json"


def _local_fs() -> pyarrow.fs.FileSystem:
    import pyarrow.fs

    return pyarrow.fs.LocalFileSystem()


def _read_record(fs: pyarrow.fs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(f"{path}/{RECORD_FILE}") as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, ValueError):  # a search started before this file existed
        return None


def _write_record(fs: pyarrow.fs.FileSystem, path: str, record: dict) -> None:
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{RECORD_FILE}") as stream:
        stream.write(json.dumps(record, indent=1).encode())


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            change
            for key in sorted(set(old) | set(new))
            for change in _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


def _as_recorded(spec: TuneJob) -> dict:
    """The spec as its search's record holds it: the fields set away from their defaults, so a
    field a later version adds (with a default) does not read as a change."""
    return spec.model_dump(mode="json", exclude_defaults=True)


def _same_search(spec: TuneJob, record: dict | None, where: str) -> None:
    """A resumed search runs the space and schedule it was started with (Tune restores them),
    so a spec that changed since is refused rather than silently half-applied."""
    if record is None:
        return
    changed = _differences(record.get("spec"), _as_recorded(spec))
    if changed:
        raise SearchError(
            f"job {spec.name!r}: a search of this name was started at {where} with another "
            f"spec ({', '.join(changed[:5])} differ); a resubmit resumes that search as it "
            "was, so put those settings back to resume it, or give the job a new name to "
            "start a new search"
        )


def _finished_trials(path: str, fs: pyarrow.fs.FileSystem) -> int:
    """How many trials Tune's newest saved experiment state lists as finished."""
    from pyarrow.fs import FileSelector

    states = sorted(
        info.path
        for info in fs.get_file_info(FileSelector(path))
        if info.base_name.startswith("experiment_state") and info.base_name.endswith(".json")
    )
    if not states:
        return 0
    with fs.open_input_stream(states[-1]) as stream:
        state = json.loads(stream.read())
    return sum(
        json.loads(trial).get("status") == "TERMINATED" for trial, *_ in state.get("trial_data", [])
    )


def _tune_config(spec: TuneJob):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    settings = spec.tune
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            max_t=spec.schedule.epochs,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
        if settings.scheduler == "asha"
        else FIFOScheduler()
    )
    return tune.TuneConfig(
        metric=settings.metric,
        mode=settings.mode,
        num_samples=settings.num_samples,
        max_concurrent_trials=settings.max_concurrent_trials,
        scheduler=scheduler,
    )


def log_best_model(
    spec: TuneJob,
    context: RunContext,
    results: ResultGrid,
    rows: list[dict],
    storage_fs: pyarrow.fs.FileSystem | None,
) -> str | None:
    """Log the best completed trial's network to its run, from the trial's last checkpoint (a
    trial stopped early has no final one); returns that run's id, None if no trial completed."""
    from ray.train import Checkpoint

    by_trial = {(result.metrics or {}).get("trial_id"): result for result in results}
    for row in rows:  # best first
        result = by_trial.get(row["trial_id"])
        path = (result.metrics or {}).get("checkpoint_path") if result else None
        if row["status"] != "completed" or row[f"best_{spec.tune.metric}"] is None or not path:
            continue
        job = trial_spec(spec, result.config, f"{spec.name}-{row['trial_id']}")
        return trainer.log_final_model(job, context, Checkpoint(path, storage_fs))
    return None


def results_table(spec: TuneJob, results: ResultGrid, facts: dict[str, dict]) -> list[dict]:
    rows = []
    for result in results:
        config = result.config or {}
        history = result.metrics_dataframe
        arch = config.get("model.arch", spec.model.arch)
        best = None
        epochs = 0
        if history is not None and spec.tune.metric in history:
            column = history[spec.tune.metric]
            best = float(column.max() if spec.tune.mode == "max" else column.min())
            epochs = int(history["epoch"].max())
        depth, width = arch_parts(arch)
        rows.append(
            {
                "arch": arch,
                "depth": depth,
                "width": width,
                "dropout": config.get("model.dropout", spec.model.dropout),
                "lr": config.get("optimizer.lr", spec.optimizer.lr),
                "params": facts.get(arch, {}).get("params"),
                "gmacs": facts.get(arch, {}).get("gmacs"),
                f"best_{spec.tune.metric}": best,
                "epochs": epochs,
                "status": "failed"
                if result.error
                else ("stopped early" if epochs < spec.schedule.epochs else "completed"),
                "run_id": (result.metrics or {}).get("mlflow_run_id"),
                "trial_id": (result.metrics or {}).get("trial_id"),
            }
        )
    key = f"best_{spec.tune.metric}"
    sign = -1 if spec.tune.mode == "max" else 1
    rows.sort(key=lambda r: math.inf if r[key] is None else sign * r[key])
    return rows


def format_table(rows: list[dict]) -> str:
    columns = [c for c in rows[0] if c not in ("run_id", "trial_id")] if rows else []
    cells = [[_cell(c, r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "params":
        return f"{value / 1e6:.2f}M"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def plot(rows: list[dict]) -> bytes:
    """PNG: best validation metric against parameters and GMACs, points labelled WRN-D-K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next(k for k in rows[0] if k.startswith("best_")) if rows else "best"
    done = [r for r in rows if r.get(metric) is not None and r.get("params")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, key, label in ((axes[0], "params", "parameters (M)"), (axes[1], "gmacs", "GMACs")):
        for row in done:
            x = row[key] / 1e6 if key == "params" else row[key]
            axis.scatter(
                x, row[metric], color="tab:red" if row["status"] != "completed" else "tab:blue"
            )
            axis.annotate(
                row["arch"].upper(),
                (x, row[metric]),
                fontsize=8,
                xytext=(3, 3),
                textcoords="offset points",
            )
        axis.set_xlabel(label)
        axis.set_ylabel(metric.removeprefix("best_"))
        axis.grid(alpha=0.3)
    fig.suptitle("width/depth search (red: stopped early or failed)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
