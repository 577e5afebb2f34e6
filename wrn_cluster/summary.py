"""The block a job ends with: outcome, wall time, best and final scores, throughput, device
hours, where the checkpoints are, the MLflow run and the registered version with its alias
decision (said once, here), and the commands to go on with. ``submit --json`` prints the same
facts as one JSON object."""

from __future__ import annotations

import math
from typing import Any

from wrn_cluster import tracking
from wrn_cluster.spec import ClassifyJob, DetectJob, TuneJob, lower_is_better
from wrn_cluster.train.metrics import duration

Spec = ClassifyJob | DetectJob | TuneJob
UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# The scores a summary names, by kind; the rest stay in MLflow.
SCORES = {
    "classify": ("val_top1", "val_top5", "val_loss", "val_top1_ema", "train_loss"),
    "detect": ("AP", "AP50", "AP75", "train_loss"),
}


def facts(spec: Spec, job_id: str, result: Any, wall_s: float) -> dict[str, Any]:
    """What a finished job did, from fit()'s Result (a search's ResultGrid) and MLflow."""
    found: dict[str, Any] = {
        "job": spec.name,
        "job_id": job_id,
        "kind": spec.kind,
        "outcome": "succeeded",
        "wall_s": round(wall_s, 1),
    }
    if spec.kind == "tune":
        found.update(_search_facts(spec, result))
    else:
        metric = spec.tracking.promotion_metric
        found.update(_run_facts(spec, result, metric, lower_is_better(metric)))
    # Held devices, at most: an elastic group may have run smaller, a search fewer trials.
    devices = spec.scaling.max_workers * (
        spec.scaling.gpus_per_worker if spec.scaling.use_gpu else 1
    )
    if spec.kind == "tune":
        devices *= min(spec.tune.max_concurrent_trials or found["trials"], found["trials"])
    found["device"] = "GPU" if spec.scaling.use_gpu else "CPU worker"
    found["device_hours"] = round(wall_s / 3600 * devices, 4)
    if spec.tracking.enabled:
        try:
            found["mlflow"] = tracking.job_outcome(tracking.tracking_uri(), spec)
        except Exception as error:  # noqa: BLE001 (the job is done; a summary never fails it)
            reason = " ".join(str(error).split())[:300]
            found["mlflow"] = {"unavailable": f"{type(error).__name__}: {reason}"}
    return found


def safe_facts(spec: Spec, job_id: str, result: Any, wall_s: float) -> dict[str, Any]:
    """``facts``, or the outcome alone with why the rest is missing: the job is done, and its
    summary must never turn it into a failure."""
    try:
        return facts(spec, job_id, result, wall_s)
    except Exception as error:  # noqa: BLE001 (a summary never fails a finished job)
        found = {"job": spec.name, "job_id": job_id, "kind": spec.kind, "outcome": "succeeded"}
        reason = " ".join(str(error).split())[:300]
        return {
            **found,
            "wall_s": round(wall_s, 1),
            "device": "",
            "device_hours": 0.0,
            "missing": f"{type(error).__name__}: {reason}",
        }


def _run_facts(spec: ClassifyJob | DetectJob, result: Any, metric: str, lower: bool) -> dict:
    final = {k: v for k, v in (result.metrics or {}).items() if _number(v)}
    epochs = result.metrics_dataframe
    if epochs is not None and metric in epochs:
        epochs = epochs.dropna(subset=[metric])
    scores = {k: round(final[k], 6) for k in SCORES[spec.kind] if k in final}
    out: dict[str, Any] = {"epochs": int(final.get("epoch", 0)), "final": scores}
    if epochs is not None and len(epochs) and metric in epochs:
        at = epochs[metric].idxmin() if lower else epochs[metric].idxmax()
        out["best"] = {
            "metric": metric,
            "value": round(float(epochs.loc[at, metric]), 6),
            "epoch": int(epochs.loc[at, "epoch"]),
        }
        if "images_per_sec" in epochs:
            out["images_per_sec"] = round(float(epochs["images_per_sec"].mean()), 1)
    keys = spec.schedule.target_keys()
    if keys:  # schedule.stop_at: reached (when, at what cost) or not
        ((target, value),) = spec.schedule.stop_at.items()
        out["target"] = {"metric": target, "value": value, "reached": keys[0] in final}
        if keys[0] in final:
            out["target"] |= {"seconds": round(final[keys[0]], 1)}
            out["target"] |= {"device_hours": round(final[keys[1]], 4)}
    if result.checkpoint is not None:
        out["checkpoint"] = result.checkpoint.path
    return out


def _search_facts(spec: TuneJob, results: Any) -> dict:
    """The trials, and the best one as the search registers it: by each trial's best
    ``tune.metric`` (``tune.mode``), among those that ran every epoch if any did."""
    metric, lower = spec.tune.metric, spec.tune.mode == "min"
    out: dict[str, Any] = {"trials": len(results), "failed_trials": len(results.errors)}
    scored = []
    for trial in results:
        history = trial.metrics_dataframe
        if trial.error is not None or history is None or metric not in history:
            continue
        values = history.dropna(subset=[metric])
        if not len(values):
            continue
        at = values[metric].idxmin() if lower else values[metric].idxmax()
        value, epoch = float(values.loc[at, metric]), int(values["epoch"].max())
        if _number(value):
            scored.append((epoch >= spec.schedule.epochs, value, epoch, trial))
    if scored:
        completed = [s for s in scored if s[0]] or scored
        pick = min if lower else max
        _, value, epoch, best = pick(completed, key=lambda s: s[1])
        out["best"] = {
            "metric": metric,
            "value": round(value, 6),
            "epoch": epoch,
            "trial": (best.metrics or {}).get("trial_id"),
        }
        if best.checkpoint is not None:
            out["checkpoint"] = best.checkpoint.path
    return out


def lines(found: dict[str, Any]) -> list[str]:
    """The summary block, one fact a line, then the next commands."""
    name = found["job"]
    out = [f"[{name}] summary: {found['kind']} job {found['job_id']} {found['outcome']}"]

    def add(label: str, text: str) -> None:
        out.append(f"[{name}]   {label:<12} {text}")

    if "missing" in found:
        add("facts", f"not all known ({found['missing']})")
    hours = f"  ({found['device_hours']} {found['device']}-h)" if found["device"] else ""
    add("wall time", f"{duration(found['wall_s'])}{hours}")
    if "trials" in found:
        add("trials", f"{found['trials']} ({found['failed_trials']} failed)")
    best = found.get("best")
    if best:
        where = f"trial {best['trial']}, " if best.get("trial") else ""
        score = _score(best["metric"], best["value"])
        add("best", f"{best['metric']} {score} ({where}epoch {best['epoch']})")
    target = found.get("target")
    if target:
        aim = f"{target['metric']} {target['value']:g}"
        add(
            "target",
            f"{aim} reached in {duration(target['seconds'])} "
            f"({target['device_hours']:.3g} device-hours)"
            if target["reached"]
            else f"{aim} not reached in {found['epochs']} epochs",
        )
    if found.get("final"):
        scores = "  ".join(f"{k} {_score(k, v)}" for k, v in found["final"].items())
        add("final", f"epoch {found['epochs']}: {scores}")
    if "images_per_sec" in found:
        add("throughput", f"{found['images_per_sec']:.0f} img/s (mean of the epochs)")
    if "checkpoint" in found:
        add("checkpoint", found["checkpoint"])
    mlflow = found.get("mlflow") or {}
    if "unavailable" in mlflow:
        add("MLflow", f"not reachable for the summary ({mlflow['unavailable']})")
    elif mlflow:
        where = mlflow.get("run_url") or f"{UI}/{mlflow['run_path']} (once `mlflow ui` runs)"
        add("MLflow run", f"{mlflow['run_id']}  {where}")
    model = mlflow.get("model")
    if model:
        add("model", f"{model['name']} v{model['version']}: {model['decision']}")
    for command in next_commands(found):
        add("next", command)
    return out


def next_commands(found: dict[str, Any]) -> list[str]:
    """What a user runs after the job: pull and predict its model, open MLflow's UI."""
    mlflow = found.get("mlflow") or {}
    model = mlflow.get("model")
    commands = []
    if model:
        uri = f"models:/{model['name']}@{model['alias']}"
        commands += [f"wrn-cluster pull {uri} --dst ./model", f"wrn-cluster predict {uri} IMAGE"]
    uri = mlflow.get("tracking_uri", "")
    if uri.startswith("sqlite:"):  # the embedded store: MLflow's UI on it, at UI
        commands.append(f"mlflow ui --backend-store-uri {uri}")
    return commands


def _score(name: str, value: float) -> str:
    return f"{value:.2%}" if "top" in name else f"{value:.4g}"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
