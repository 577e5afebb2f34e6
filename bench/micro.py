"""The micro-measurements behind three defaults, per core (one thread, process CPU time):

1. the SGD step alone, for-loop vs foreach vs fused (WRN-28-10 and WRN-50-2 parameters);
2. decoding the input bench's photo JPEGs: PIL vs simplejpeg vs torchvision.io;
3. normalizing a uint8 batch on the CPU, NCHW vs channels_last.

    .venv/bin/python bench/micro.py
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import simplejpeg
import torch
from PIL import Image

from wrn_cluster.bench.input_pipeline import write_photo_jpegs
from wrn_cluster.models import build_model
from wrn_cluster.spec import IMAGENET_MEAN_STD
from wrn_cluster.train.classify import normalization, to_input


def cpu_ms(run: Callable[[], object], repeat: int = 9, per: int = 1) -> float:
    """Median CPU milliseconds of ``run()`` (divided by ``per``) over ``repeat`` calls."""
    run()
    times = []
    for _ in range(repeat):
        start = time.process_time()
        run()
        times.append((time.process_time() - start) * 1e3 / per)
    return statistics.median(times)


def optimizer_steps() -> None:
    for arch, classes in (("wrn-28-10", 10), ("wrn-50-2", 1000)):
        shown = []
        for kind in ("for-loop", "foreach", "fused"):
            model = build_model(arch, classes).to(memory_format=torch.channels_last)
            for param in model.parameters():
                param.grad = torch.randn_like(param) * 1e-3
            implementation = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}}
            optimizer = torch.optim.SGD(
                model.parameters(),
                lr=0.1,
                momentum=0.9,
                nesterov=True,
                weight_decay=5e-4,
                **implementation.get(kind, {"fused": True}),
            )
            shown.append(f"{kind} {cpu_ms(optimizer.step):.0f} ms")
        print(f"SGD step, {arch}: " + ", ".join(shown))


def decoders() -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    with tempfile.TemporaryDirectory() as folder:
        files = sorted(write_photo_jpegs(folder, 64).glob("train/*/*.jpg"))
        blobs = [path.read_bytes() for path in files]
    warnings.simplefilter("ignore")  # torchvision.io's decoders are deprecated since 0.29

    def pil() -> None:
        for data in blobs:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB")

    def turbo() -> None:
        for data in blobs:
            simplejpeg.decode_jpeg(data, "RGB")

    def tvio() -> None:
        for data in blobs:
            decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)

    per = len(blobs)
    print(
        f"decode, {per} photo JPEGs ~500x375 q90: PIL {cpu_ms(pil, per=per):.3f} ms, "
        f"simplejpeg {cpu_ms(turbo, per=per):.3f} ms, torchvision.io {cpu_ms(tvio, per=per):.3f} ms"
    )


def normalizing() -> None:
    batch = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8)
    device = torch.device("cpu")
    scale, shift = normalization(IMAGENET_MEAN_STD, device)
    nchw = cpu_ms(lambda: to_input(batch, device, scale, shift), per=32)

    def channels_last() -> torch.Tensor:
        images = batch.contiguous(memory_format=torch.channels_last)
        return images.float().mul_(scale).add_(shift)

    print(
        f"normalize a 32x3x224x224 uint8 batch: NCHW {nchw:.3f} ms/image, "
        f"channels_last {cpu_ms(channels_last, per=32):.3f} ms/image"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"{Path(__file__).name}: one thread, process CPU time, medians of 9")
    optimizer_steps()
    decoders()
    normalizing()
