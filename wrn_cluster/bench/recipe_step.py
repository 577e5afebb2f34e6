"""`wrn-cluster bench recipe-step`: what each recipe option (issue 18) costs a training step.

Baseline: the project's plain step (``wrn_cluster.train.classify``, the paper's recipe: cross-
entropy, no mixing, no EMA), built from a job spec exactly as the loop builds it. Variants: the
same step with one option on (MixUp, CutMix, label smoothing, binary cross-entropy, gradient
clipping, an EMA update every step or every 32, progressive resizing's smaller batch), and all of
torchvision's V2 options together. Every variant gets the same network, initial weights and batch,
in the same process, interleaved round by round. The one-line ratio is the V2 set's images/s over
the plain step's.

Per image, in the loader processes: the reader's view (RandomResizedCropFlip at the size, from a
decoded photo-like 500x375 image) plain and with each per-image option (TrivialAugmentWide,
RandAugment, random erasing), one thread, as a loader process runs it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from wrn_cluster.bench.common import Comparison, Say, Variant, interleave, machine, quiet
from wrn_cluster.data import transforms
from wrn_cluster.models import build_model
from wrn_cluster.spec import ClassifyJob
from wrn_cluster.train import classify
from wrn_cluster.train.ema import WeightAverage

# Each option as the spec sections that turn it on (merged into the plain job).
OPTIONS: dict[str, dict[str, Any]] = {
    "mixup 0.2": {"data": {"augmentation": {"mixup": 0.2}}},
    "cutmix 1.0": {"data": {"augmentation": {"cutmix": 1.0}}},
    "label smoothing 0.1": {"optimizer": {"label_smoothing": 0.1}},
    "binary cross-entropy": {"optimizer": {"loss": "binary_cross_entropy"}},
    "grad clip 1.0": {"optimizer": {"grad_clip_norm": 1.0}},
    "ema every step": {"ema": {"decay": 0.9999, "every_steps": 1}},
    "ema every 32 steps": {"ema": {"decay": 0.9999, "every_steps": 32}},
    "progressive at 0.8x size": {"progressive": 0.8},
}
V2_SET = {  # torchvision's V2 recipe's step options together (jobs/imagenet_wrn50_2_tv2.yaml)
    "data": {"augmentation": {"mixup": 0.2, "cutmix": 1.0}},
    "optimizer": {"label_smoothing": 0.1, "decay_norm_and_bias": False},
    "ema": {"decay": 0.998908, "every_steps": 32},
}
PER_IMAGE = {
    "trivial_augment": transforms.Policy("trivial_augment"),
    "rand_augment": transforms.Policy("rand_augment"),
    "random_erasing 0.1": transforms.Policy("none", 0.1),
    "trivial_augment + erasing 0.1": transforms.Policy("trivial_augment", 0.1),
}


def job(arch: str, size: int, batch: int, classes: int, **sections: Any) -> ClassifyJob:
    spec: dict[str, Any] = {
        "kind": "classify",
        "name": "bench-recipe-step",
        "model": {"arch": arch, "num_classes": classes},
        "data": {"dataset": "imagefolder", "url": "/bench/unused", "image_size": size},
        "scaling": {"workers": 1},
        "precision": {"dtype": "fp32", "channels_last": False},
    }
    spec["data"]["batch_size"] = batch
    for section, values in sections.items():
        if section == "data":
            spec["data"] = {**spec["data"], **values}
        else:
            spec[section] = values
    return ClassifyJob.model_validate(spec)


def _runner(spec: ClassifyJob, size: int | None, seed: int) -> Callable[..., None]:
    """One step of ``spec``'s recipe, plus its EMA update, at ``size`` (None: the loader's)."""
    torch.manual_seed(seed)
    model = build_model(spec.model.arch, spec.model.num_classes or 10).train()
    step = classify.step(spec, model, torch.device("cpu"))
    step.size = size
    average = WeightAverage(model, spec.ema) if spec.ema else None
    done = [0]

    def run(images: torch.Tensor, labels: torch.Tensor) -> None:
        step(images, labels)
        done[0] += 1
        if average:
            average.after_step(done[0], model)

    return run


def run(
    arch: str = "wrn-16-4",
    image_size: int = 32,
    batch: int = 64,
    rounds: int = 5,
    steps: int = 32,
    image_rounds: int = 5,
    threads: int | None = None,
    seed: int = 0,
    say: Say = quiet,
) -> Comparison:
    """Time the plain step against each option's and the V2 set's (``steps`` steps a round,
    a multiple of 32 so the every-32 EMA updates as often as it would in training), then the
    per-image options in the loader's view."""
    if threads:
        torch.set_num_threads(threads)
    classes = 10
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 3, image_size, image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    smaller = max(8, round(image_size * 0.8))
    runners: dict[str, Callable[..., None]] = {
        "plain": _runner(job(arch, image_size, batch, classes), None, seed)
    }
    for name, sections in OPTIONS.items():
        if "progressive" in sections:
            runners[name] = _runner(job(arch, image_size, batch, classes), smaller, seed)
        else:
            runners[name] = _runner(job(arch, image_size, batch, classes, **sections), None, seed)
    runners["V2 set"] = _runner(job(arch, image_size, batch, classes, **V2_SET), None, seed)
    for once in runners.values():  # warm-up
        once(images, labels)

    def chunk(once: Callable[..., None]) -> Callable[[], int]:
        def timed() -> int:
            for _ in range(steps):
                once(images, labels)
            return steps * batch

        return timed

    rates = interleave({n: chunk(once) for n, once in runners.items()}, rounds, say)
    plain = statistics.median(rates["plain"])
    extra: dict[str, Any] = {
        f"step {name} / plain": round(statistics.median(r) / plain, 3)
        for name, r in rates.items()
        if name not in ("plain", "V2 set")
    }
    extra["ema every step: numbers averaged"] = sum(
        t.numel()
        for net in [build_model(arch, classes)]
        for t in [*net.parameters(), *net.buffers()]
    )
    extra |= per_image_costs(image_rounds, say)
    return Comparison(
        bench="recipe-step",
        unit="img/s",
        baseline=Variant(
            "plain", "the paper's recipe: cross-entropy, no mixing, no EMA", rates["plain"]
        ),
        project=Variant(
            "V2 set",
            "mixup 0.2 / cutmix 1.0, label smoothing 0.1, no decay on norms, ema every 32",
            rates["V2 set"],
        ),
        settings={
            "model": arch,
            "image_size": image_size,
            "batch": batch,
            "device": "cpu",
            "rounds": rounds,
            "steps_per_round": steps,
            "threads": torch.get_num_threads(),
            "precision": {"dtype": "fp32", "channels_last": False},
        },
        extra=extra,
        notes=[
            "progressive resizing's row is the step at 0.8x the loader's size (the batch "
            "resized on the device), as in its first epochs",
            "per-image rows: microseconds per image in one loader process, the view then the "
            "option, best of the rounds",
        ],
        machine=machine("cpu"),
    )


def per_image_costs(rounds: int, say: Say) -> dict[str, float]:
    """Microseconds per image of the 224 px training view, plain and with each option."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:375, 0:500]
    photo = np.stack([(cols * 0.5) % 256, (rows * 0.7) % 256, ((cols + rows) * 0.3) % 256], -1)
    photo = (photo + rng.integers(0, 30, photo.shape)).astype(np.uint8)
    image = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    view = transforms.RandomResizedCropFlip(224)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a loader process runs
    try:
        costs = {}
        for name, policy in {"plain view": None, **PER_IMAGE}.items():

            def one(i: int, policy=policy) -> None:
                generator = transforms.item_generator(0, 1, i)
                out = view(image, generator)
                if policy:
                    policy(out, generator)

            timings = []
            for r in range(rounds):
                start = time.perf_counter()
                for i in range(60):
                    one(r * 60 + i)
                timings.append((time.perf_counter() - start) / 60 * 1e6)
            costs[f"224px view us/image: {name}"] = round(min(timings), 1)
            say(f"{name}: {costs[f'224px view us/image: {name}']} us/image")
        return costs
    finally:
        torch.set_num_threads(threads)
