"""What MLflow tracking costs a training epoch: the same train steps with and without the
project's tracker logging every step's loss and lr (50x the default rate) and the epoch's
metrics to a real MLflow store. mlflow is imported only when the bench runs."""

from __future__ import annotations

import tempfile
import time

from wrn_cluster.bench.common import Comparison, Say, Variant, interleave, quiet
from wrn_cluster.models import build_model
from wrn_cluster.spec import parse
from wrn_cluster.tracking import RunContext, RunTracker

SPEC = """\
kind: classify
name: bench-tracking
data: {dataset: imagefolder, url: /unused, image_size: %d, batch_size: %d}
scaling: {workers: 1}
tracking: {experiment: bench-tracking}
"""


def run(
    model_name: str = "wrn-16-2",
    size: int = 32,
    batch: int = 32,
    steps: int = 40,
    rounds: int = 3,
    say: Say = quiet,
) -> Comparison:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build_model(model_name, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    epochs = {"n": 0}

    def epoch(tracker: RunTracker | None) -> int:
        for step in range(steps):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if tracker:
                tracker.log_metrics({"step_train_loss": loss.item(), "step_lr": 0.01}, step)
        if tracker:
            epochs["n"] += 1
            tracker.log_metrics({"train_loss": loss.item(), "val_top1": 0.5}, epochs["n"])
        return steps * batch

    with tempfile.TemporaryDirectory() as home:
        context = RunContext(tracking_uri=f"sqlite:///{home}/mlflow.db", artifact_root=home)
        tracker = RunTracker(parse(SPEC % (size, batch)), context)
        rates = interleave(
            {"no tracking": lambda: epoch(None), "tracked": lambda: epoch(tracker)}, rounds, say
        )
        started = time.perf_counter()
        tracker.close()
        close_s = time.perf_counter() - started
    return Comparison(
        bench="tracking-overhead",
        unit="img/s",
        baseline=Variant("no tracking", "train steps only", rates["no tracking"]),
        project=Variant(
            "tracked",
            "RunTracker: every step's loss and lr, each epoch's metrics, to MLflow (SQLite)",
            rates["tracked"],
        ),
        settings={
            "model": model_name,
            "size": size,
            "batch": batch,
            "steps": steps,
            "rounds": rounds,
        },
        extra={
            "close_and_flush_s": round(close_s, 3),
            "values_logged": epochs["n"] * (2 * steps + 2),
        },
    )
