"""`wrn-cluster bench train-step`: images per second of forward + backward + optimizer step.

Baseline: the step of torchvision's reference classification script
(references/classification/train.py): a normalized float32 NCHW batch from the loader, eager,
``torch.optim.SGD`` with its default implementation, fp32 (or, with ``baseline="fp16"``, its
``--amp`` mode: fp16 autocast and a GradScaler), and the loss and top-1 read back to the host every
step for its metric logger. Project: ``wrn_cluster.train.classify`` built from a job spec with the
defaults for the device, exactly as the training loop builds it, fed the uint8 batch our loader
gives. Both get the same network, initial weights and batch, in the same process, interleaved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from wrn_cluster.bench.common import Comparison, Say, Variant, interleave, machine, quiet
from wrn_cluster.models import build_model, measure_gmacs, parse_name
from wrn_cluster.spec import ClassifyJob
from wrn_cluster.train import classify

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, matched in the device name.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM ("H100 80GB HBM3")
    ("H200", 989.4),
    ("A100", 312.0),
)
BASELINES = {
    "fp32": "torchvision reference: fp32, NCHW, eager, torch.optim.SGD, .item() every step",
    "fp16": "torchvision reference --amp: fp16 autocast + GradScaler, NCHW, eager, SGD",
}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "NVL" in name:  # NVL parts run at other clocks; no peak we can vouch for
        return None
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bench_spec(
    arch: str, image_size: int, batch: int, num_classes: int, precision: dict[str, Any]
) -> ClassifyJob:
    """The job spec the project's step is built from: defaults, but for what the bench sets."""
    return ClassifyJob.model_validate(
        {
            "kind": "classify",
            "name": "bench-train-step",
            "model": {"arch": arch, "num_classes": num_classes},
            "data": {
                "dataset": "imagefolder",
                "url": "/bench/unused",
                "image_size": image_size,
                "batch_size": batch,
            },
            "scaling": {"workers": 1},
            "precision": precision,
        }
    )


def _reference_step(
    arch: str, num_classes: int, device: torch.device, amp_fp16: bool, seed: int
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    torch.manual_seed(seed)
    model = build_model(arch, num_classes).to(device).train()
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    scaler = torch.amp.GradScaler(device.type) if amp_fp16 else None

    def run(images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp_fp16):
            output = model(images)
            loss = criterion(output, labels)
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        top1 = (output.argmax(1) == labels).float().mean() * 100
        loss.item(), top1.item()  # what the reference's metric logger reads every step

    return run


def _project_step(
    spec: ClassifyJob, device: torch.device, seed: int
) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], classify.TrainStep]:
    torch.manual_seed(seed)
    model = build_model(spec.model.arch, spec.model.num_classes or 10)
    model = model.to(memory_format=classify.memory_format(spec, device)).to(device).train()
    step = classify.step(spec, model, device)
    totals = torch.zeros(len(classify.SUMS), device=device, dtype=torch.float64)

    def run(images: torch.Tensor, labels: torch.Tensor) -> None:
        _, stats = step(images, labels)
        totals.add_(stats)  # summed on the device, as the loop does

    return run, step


def _describe(step: classify.TrainStep) -> str:
    optimizer = type(step.optimizer).__name__
    defaults = step.optimizer.defaults
    kind = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "loop"
    compiled = "torch.compile" if step.forward is not step.model else "eager"
    layout = "channels_last" if step.layout == torch.channels_last else "NCHW"
    precision = "fp32" if step.dtype == "fp32" else f"{step.dtype} autocast"
    return (
        f"wrn_cluster.train.classify step: {precision}, {layout}, {compiled}, "
        f"{optimizer} ({kind}), uint8 in, normalized on the device, no host syncs"
    )


@dataclass
class Plan:
    """What one bench run measures; ``batch`` may be halved to fit the device."""

    arch: str
    size: int
    batch: int
    classes: int
    device: torch.device
    baseline: str
    precision: dict[str, Any]
    rounds: int
    steps: int
    warmup: int
    seed: int
    cpu_time: bool


def run(
    arch: str = "wrn-28-10",
    image_size: int | None = None,
    batch: int = 64,
    device: str = "auto",
    baseline: str = "fp32",
    precision: dict[str, Any] | None = None,
    rounds: int = 5,
    steps: int = 2,
    warmup: int = 1,
    num_classes: int | None = None,
    threads: int | None = None,
    seed: int = 0,
    cpu_time: bool = False,
    say: Say = quiet,
) -> Comparison:
    """Time the reference step and the project's step on one network, size and batch.

    ``precision`` overrides the spec's precision section (dtype, channels_last, compile) to
    measure what each setting is worth; left out, the project runs with its defaults.
    ``cpu_time`` counts this process's CPU seconds instead of wall seconds (CPU only; with
    ``threads=1``, the work of one core whatever else shares the machine).
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    info = parse_name(arch)
    dev = resolve_device(device)
    if baseline == "fp16" and dev.type != "cuda":
        raise ValueError("the fp16 (--amp) baseline is defined on CUDA only; use fp32 on the CPU")
    if cpu_time and dev.type != "cpu":
        raise ValueError("--cpu-time measures CPU work; it needs --device cpu")
    if threads:
        torch.set_num_threads(threads)
    plan = Plan(
        arch=arch,
        size=image_size or info.default_image_size,
        batch=batch,
        classes=num_classes or (10 if info.family == "cifar" else 1000),
        device=dev,
        baseline=baseline,
        precision=precision or {},
        rounds=rounds,
        steps=steps,
        warmup=warmup,
        seed=seed,
        cpu_time=cpu_time,
    )
    notes: list[str] = []
    while True:
        try:
            return _measure(plan, notes, say)
        except torch.OutOfMemoryError:
            if plan.batch == 1:
                raise
            notes.append(f"batch {plan.batch} ran out of device memory; halved")
            say(notes[-1])
            plan.batch //= 2
            torch.cuda.empty_cache()


def _measure(plan: Plan, notes: list[str], say: Say) -> Comparison:
    arch, size, batch, classes, dev = plan.arch, plan.size, plan.batch, plan.classes, plan.device
    spec = bench_spec(arch, size, batch, classes, plan.precision)
    generator = torch.Generator().manual_seed(plan.seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in spec.data.mean_std())
    normalized = (images.float() / 255 - mean) / std  # the reference's loader hands this over
    if dev.type == "cuda":  # both loaders pin their batches
        images, labels, normalized = (
            images.pin_memory(),
            labels.pin_memory(),
            normalized.pin_memory(),
        )

    reference = _reference_step(arch, classes, dev, plan.baseline == "fp16", plan.seed)
    project, step = _project_step(spec, dev, plan.seed)
    runs_once = {
        "reference": lambda: reference(normalized, labels),
        "project": lambda: project(images, labels),
    }
    warmup_s = {}
    for name, once in runs_once.items():
        start = time.perf_counter()
        for _ in range(plan.warmup):
            once()
        _synchronize(dev)
        warmup_s[name] = round(time.perf_counter() - start, 2)
        say(f"{name}: warm-up {warmup_s[name]:.1f}s")

    def chunk(once: Callable[[], None]) -> Callable[[], int]:
        def timed() -> int:
            for _ in range(plan.steps):
                once()
            _synchronize(dev)
            return plan.steps * batch

        return timed

    clock = time.process_time if plan.cpu_time else time.perf_counter
    timed = {n: chunk(once) for n, once in runs_once.items()}
    rates = interleave(timed, plan.rounds, say, clock)
    gmacs = measure_gmacs(build_model(arch, classes), size)
    # Training costs about three forward passes: forward, and twice that for the backward.
    tflop_per_image = 3 * 2 * gmacs / 1e3
    ref = Variant("reference", BASELINES[plan.baseline], rates["reference"])
    ours = Variant("project", _describe(step), rates["project"])
    extra: dict[str, Any] = {
        "gmacs_per_image": round(gmacs, 4),
        "reference_tflops": _sig(ref.median * tflop_per_image),
        "project_tflops": _sig(ours.median * tflop_per_image),
        "warmup_s": warmup_s,
    }
    peak = peak_tflops(dev)
    if peak:
        extra["project_mfu_vs_bf16_peak"] = _sig(ours.median * tflop_per_image / peak)
    return Comparison(
        bench="train-step",
        unit="img/CPU-s" if plan.cpu_time else "img/s",
        baseline=ref,
        project=ours,
        settings={
            "model": arch,
            "image_size": size,
            "batch": batch,
            "device": str(dev),
            "baseline": plan.baseline,
            "rounds": plan.rounds,
            "steps_per_round": plan.steps,
            "clock": "process CPU time" if plan.cpu_time else "wall",
            "threads": torch.get_num_threads(),
            # As resolved for the device.
            "precision": {
                **spec.precision.model_dump(),
                "dtype": step.dtype,
                "channels_last": step.layout == torch.channels_last,
            },
        },
        extra=extra,
        notes=notes,
        machine=machine(str(dev)),
    )


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
