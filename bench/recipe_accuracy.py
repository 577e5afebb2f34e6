"""Digits accuracy (scikit-learn's 1,797 real 8x8 digits, as 16 px JPEGs) with the paper's
recipe and with the short ImageNet recipe's options (jobs/imagenet_wrn50_2_fast.yaml: label
smoothing, EMA, no decay on norms, progressive resizing, flip test-time augmentation) at equal
epochs, for three seeds each, on an embedded Ray (2 CPU workers); and the short recipe without
flip TTA (a mirrored digit is often another digit). Prints each run's final val_top1 (raw, and
the EMA's), then the medians.

    RAY_AUTH_MODE=disabled .venv/bin/python bench/recipe_accuracy.py [--epochs 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests.datasets writes the digits

from tests.datasets import write_digits_imagefolder  # noqa: E402
from wrn_cluster import driver  # noqa: E402
from wrn_cluster.bench.common import machine  # noqa: E402
from wrn_cluster.spec import parse  # noqa: E402


def job(data: Path, storage: Path, name: str, seed: int, epochs: int, recipe: str) -> dict:
    spec = {
        "kind": "classify",
        "name": name,
        "seed": seed,
        "model": {"arch": "wrn-10-2"},
        "data": {
            "dataset": "imagefolder",
            "url": str(data),
            "image_size": 16,
            "eval_resize": 16,
            "batch_size": 64,
            "loader_workers": 0,
            "augment": False,
        },
        "optimizer": {"lr": 0.05, "weight_decay": 5e-4},
        "schedule": {"epochs": epochs, "type": "cosine", "warmup_epochs": 1},
        "scaling": {"workers": 2},
        "precision": {"dtype": "fp32"},
        "checkpoint": {"storage": str(storage), "keep": 1},
        "tracking": {"enabled": False},
    }
    if recipe != "paper":  # the short ImageNet recipe's options, at the digits' scale (23 steps)
        spec["optimizer"] |= {"label_smoothing": 0.1, "decay_norm_and_bias": False}
        spec["ema"] = {"decay": 0.98, "every_steps": 1, "warmup_steps": 23}
        spec["data"] |= {
            "progressive": {"start": 8, "end": 16, "from_epoch": 0, "to_epoch": epochs - 2},
            "eval_flip": recipe == "fast",  # mirrored digits are other digits: also without
        }
        spec["data"]["progressive"]["multiple"] = 4
    return spec


RECIPES = ("paper", "fast", "fast-no-flip")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, object_store_memory=128 * 1024**2, include_dashboard=False)
    found: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        data = Path(root) / "digits"
        write_digits_imagefolder(data, size=16)
        for seed in args.seeds:
            for recipe in RECIPES:
                name = f"{recipe}-{seed}"
                text = yaml.safe_dump(
                    job(data, Path(root) / "runs", name, seed, args.epochs, recipe)
                )
                spec = parse(text, "bench.yaml")
                driver.prepare(spec)
                metrics = driver.run(spec).metrics
                line = f"{name}: val_top1 {metrics['val_top1']:.4f}"
                found.setdefault(recipe, []).append(metrics["val_top1"])
                if "val_top1_ema" in metrics:
                    line += f", ema {metrics['val_top1_ema']:.4f}"
                    shipped = max(metrics["val_top1"], metrics["val_top1_ema"])
                    found.setdefault(f"{recipe} (shipped: better of raw, ema)", []).append(shipped)
                print(line, flush=True)
    ray.shutdown()
    print(f"machine: {machine('cpu')['summary']}")
    for recipe, values in found.items():
        shown = ", ".join(f"{v:.4f}" for v in values)
        print(f"{recipe}: median val_top1 {statistics.median(values):.4f} ({shown})")


if __name__ == "__main__":
    main()
