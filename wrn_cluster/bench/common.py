"""What every bench shares: interleaved timing, the comparison it reports, the machine it ran on."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Say = Callable[[str], object]


def quiet(_: str) -> None:
    pass


@dataclass
class Variant:
    name: str
    description: str
    rates: list[float] = field(default_factory=list)  # units per second, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.rates), max(self.rates)


@dataclass
class Comparison:
    bench: str
    unit: str
    baseline: Variant
    project: Variant
    settings: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # per-bench figures (TFLOP/s, times)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=lambda: machine())

    @property
    def ratio(self) -> float:
        return self.project.median / self.baseline.median

    @property
    def round_ratios(self) -> list[float]:
        """Project over baseline within each round: the pairs ran seconds apart."""
        return [p / b for p, b in zip(self.project.rates, self.baseline.rates, strict=True)]

    def lines(self) -> list[str]:
        settings = "  ".join(f"{k}={v}" for k, v in self.settings.items())
        out = [f"{self.bench}  {settings}", f"machine: {self.machine['summary']}"]
        width = max(len(self.baseline.name), len(self.project.name))
        for variant in (self.baseline, self.project):
            low, high = variant.spread
            out.append(
                f"  {variant.name:<{width}}  {variant.median:10.2f} {self.unit}  "
                f"(range {low:.2f}-{high:.2f} over {len(variant.rates)} rounds)  "
                f"{variant.description}"
            )
        for key, value in self.extra.items():
            out.append(f"  {key}: {_show(value)}")
        out.extend(f"  note: {note}" for note in self.notes)
        low, high = min(self.round_ratios), max(self.round_ratios)
        out.append(f"  per-round ratio range {low:.2f}-{high:.2f}")
        out.append(f"{self.bench}: ratio {self.ratio:.2f} (project vs baseline)")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            # Unrounded: the table prints them to 2 places as the ratio line does, and a value
            # rounded twice (0.955049 -> 0.955 -> "0.95") would differ from it ("0.96").
            "ratio": self.ratio,
            "round_ratios": self.round_ratios,
            "unit": self.unit,
            "baseline": _variant_json(self.baseline),
            "project": _variant_json(self.project),
            "settings": self.settings,
            "extra": self.extra,
            "notes": self.notes,
            "machine": self.machine,
        }

    def write_json(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def markdown_table(results: list[dict[str, Any]]) -> str:
    """Results written by ``Comparison.write_json`` as one Markdown table."""
    keys = ("model", "image_size", "size", "batch", "device", "baseline", "workers")
    rows = [
        "| bench | settings | baseline | project | ratio | per-round ratios | project TFLOP/s "
        "(MFU) | machine |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        settings = ", ".join(
            f"{k} {result['settings'][k]}" for k in keys if k in result["settings"]
        )
        precision = result["settings"].get("precision")
        if precision:
            settings += ", " + ", ".join(f"{k} {v}" for k, v in precision.items())
        unit = result["unit"]
        ratios = result["round_ratios"]
        extra = result.get("extra", {})
        flops = f"{extra['project_tflops']:g}" if "project_tflops" in extra else "-"
        if "project_mfu_vs_bf16_peak" in extra:
            flops += f" ({extra['project_mfu_vs_bf16_peak']:.1%})"
        rows.append(
            f"| {result['bench']} | {settings} | {result['baseline']['median']:.2f} {unit} "
            f"| {result['project']['median']:.2f} {unit} | **{result['ratio']:.2f}** "
            f"| {min(ratios):.2f}-{max(ratios):.2f} | {flops} | {result['machine']['summary']} |"
        )
    return "\n".join(rows)


def _variant_json(variant: Variant) -> dict[str, Any]:
    low, high = variant.spread
    return {
        "name": variant.name,
        "description": variant.description,
        "median": round(variant.median, 4),
        "min": round(low, 4),
        "max": round(high, 4),
        "rates": [round(r, 4) for r in variant.rates],
    }


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def interleave(
    runs: dict[str, Callable[[], int]],
    rounds: int,
    say: Say = quiet,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time each ``run() -> units done`` once per round, alternating which goes first.

    ``clock=time.process_time`` counts this process's CPU seconds instead of wall seconds: for
    single-threaded work, what one core does, whatever else shares the machine.
    """
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        # Alternating the order keeps a slow neighbour or thermal drift from favouring one.
        for name in names if r % 2 == 0 else names[::-1]:
            start = clock()
            done = runs[name]()
            rates[name].append(done / (clock() - start))
        shown = "  ".join(f"{name} {rates[name][-1]:.2f}" for name in names)
        say(f"round {r + 1}/{rounds}: {shown}")
    return rates


# The vector and matrix extensions the CPU defaults depend on (bf16 above all).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine(device: str = "cpu") -> dict[str, Any]:
    """What ran the bench: CPU model and cores, accelerator, torch build, date (UTC)."""
    import torch

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as info:
            lines = info.readlines()
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu
        )
        found = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
        flags = [flag for flag in CPU_FLAGS if flag in found]
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    facts: dict[str, Any] = {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": cores,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    facts["summary"] = (
        f"{facts.get('gpu', 'no GPU')}; {cpu}, {cores} cores ({' '.join(flags) or 'no AVX'}); "
        f"torch {facts['torch']}; "
        f"{facts['date']}"
    )
    return facts
