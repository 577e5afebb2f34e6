"""`wrn-cluster bench input-storage`: training images per second of one loader process reading
from an S3 endpoint with a fixed delay added to every request, per-image reads against shards.

Baseline: today's per-image reader (``data.imagefolder``: one GET per image) from S3 with
``--delay-ms`` (20 by default) added to each request. Project: the same images packed into
shards (``data.shards``, streamed whole by MosaicML Streaming) from the same endpoint and delay.
Also measured, as extras: both readers at 0, 20 and 60 ms, and both from local disk.

The endpoint is moto's S3 server, started by the bench in a process of its own behind a WSGI
layer that sleeps before answering each request (moto is a test dependency: ``pip install
'moto[server]'``). The files are the photo JPEGs of `bench input` (500x375) at quality 98,
about 105 KB like ImageNet's 110 KB. Every variant decodes and augments at ``--size`` with the
training transforms, in one process without DataLoader workers; timed in wall seconds (the
waits are the point), in interleaved rounds. Each shard round streams into an empty cache.

Where the CPU allows (Linux, two cores or more), the server runs on the last core and the reader
on the others, as a store on other machines would: on a 2-core machine moto's own request
handling (Python, about as much CPU per byte as the reader's hashing) would otherwise take
turns with the reader on its core, and the S3 figures would measure moto, not the reader.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from wrn_cluster.bench.common import Comparison, Say, Variant, interleave, quiet
from wrn_cluster.bench.input_pipeline import write_photo_jpegs
from wrn_cluster.data import imagefolder, shards
from wrn_cluster.data.storage import filesystem

BUCKET = "bench"
PHOTO_QUALITY = 98  # 500x375 crops of the sample photos at this quality: ~105 KB, ImageNet-like
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def server_core() -> int | None:
    """The core the S3 server gets to itself (the last), or None where it cannot have one."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    return cores[-1] if len(cores) >= 2 else None


class DelayedS3:
    """moto's S3 on 127.0.0.1 in a process of its own (not competing with the readers for this
    one's interpreter lock), each request answered ``delay_s`` late; settable while it runs.
    With ``core``, the server runs on that core only. ``fail`` makes it answer some GETs with
    HTTP 500 (S3's InternalError), for tests of a read that fails mid-run."""

    def __init__(self, core: int | None = None) -> None:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise ValueError(
                "bench input-storage starts moto's S3 server; install it: pip install "
                "'moto[server]'"
            ) from None
        context = multiprocessing.get_context("spawn")
        self._delay = context.Value("d", 0.0)
        self._faults = Faults(context)
        ports = context.Queue()
        self._process = context.Process(
            target=_serve, args=(self._delay, self._faults, ports, core), daemon=True
        )
        self._process.start()
        self.url = f"http://127.0.0.1:{ports.get(timeout=60)}"

    @property
    def delay_s(self) -> float:
        return self._delay.value

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        self._delay.value = value

    def fail(self, text: str, times: int | None = None) -> None:
        """Answer the GETs whose path holds ``text`` with HTTP 500: the next ``times`` of them,
        or all (None); "" fails none."""
        self._faults.set(text, times)

    @property
    def failed_at(self) -> list[float]:
        """When (time.time()) each GET answered with a failure came, oldest first."""
        return self._faults.times()

    def close(self) -> None:
        self._process.terminate()
        self._process.join(10)


class Faults:
    """Which GETs the server fails, shared with its process: the text their path holds, how
    many more to fail (-1: all), and when each failed one came (the first FAULT_LOG)."""

    def __init__(self, context: Any) -> None:
        self._text = context.Array("c", FAULT_TEXT)
        self._left = context.Value("i", 0)
        self._count = context.Value("i", 0)
        self._at = context.Array("d", FAULT_LOG)

    def set(self, text: str, times: int | None) -> None:
        encoded = text.encode()
        if len(encoded) >= FAULT_TEXT:
            raise ValueError(f"a failing path's text is at most {FAULT_TEXT - 1} bytes")
        with self._left.get_lock():
            self._text.value = encoded
            self._left.value = -1 if times is None else times

    def hit(self, path: str) -> bool:
        """Whether to fail a GET of ``path`` (and if so, it is counted)."""
        with self._left.get_lock():
            text = self._text.value.decode()
            if not text or text not in path or self._left.value == 0:
                return False
            if self._left.value > 0:
                self._left.value -= 1
            if self._count.value < FAULT_LOG:
                self._at[self._count.value] = time.time()
            self._count.value += 1
            return True

    def times(self) -> list[float]:
        with self._left.get_lock():
            return list(self._at[: min(self._count.value, FAULT_LOG)])


FAULT_TEXT = 256  # bytes of a failing path's text, at most
FAULT_LOG = 256  # failed GETs whose time is kept
FAILURE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code><Message>'
    b"We encountered an internal error. Please try again.</Message></Error>"
)


def _serve(delay: Any, faults: Faults, ports: Any, core: int | None) -> None:
    """The server process: moto's S3 behind a WSGI layer that sleeps ``delay`` per request and
    answers the GETs ``faults`` names with HTTP 500."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    moto_app = DomainDispatcherApplication(create_backend_app)

    def delayed(environ: dict, start_response: Callable) -> Any:
        if delay.value:
            time.sleep(delay.value)
        if environ["REQUEST_METHOD"] == "GET" and faults.hit(environ.get("PATH_INFO", "")):
            start_response(
                "500 Internal Server Error",
                [("Content-Type", "application/xml"), ("Content-Length", str(len(FAILURE)))],
            )
            return [FAILURE]
        return moto_app(environ, start_response)

    server = make_server("127.0.0.1", 0, delayed, threaded=True)
    ports.put(server.server_port)
    server.serve_forever()


def _count(loader: DataLoader) -> int:
    return sum(len(labels) for _, labels in loader)


def run(
    images: int = 640,
    size: int = 224,
    batch: int = 32,
    rounds: int = 3,
    delays_ms: tuple[int, ...] = (0, 20, 60),
    delay_ms: int = 20,
    images_per_shard: int = 64,
    seed: int = 0,
    say: Say = quiet,
) -> Comparison:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = {key: os.environ.get(key) for key in ("AWS_ENDPOINT_URL_S3", *CREDENTIALS)}
    core = server_core()
    s3 = DelayedS3(core)
    cores = os.sched_getaffinity(0) if core is not None else None
    if cores is not None:
        os.sched_setaffinity(0, cores - {core})  # the reader (and its threads) off the server's
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL_S3=s3.url)
    try:
        with tempfile.TemporaryDirectory(prefix="wrn-bench-storage-") as scratch:
            root = Path(scratch)
            folder = write_photo_jpegs(root / "photos", images, seed, quality=PHOTO_QUALITY)
            jpeg_kb = statistics.mean(p.stat().st_size for p in folder.rglob("*.jpg")) / 1024
            fs, _ = filesystem(f"s3://{BUCKET}")
            fs.mkdir(BUCKET)
            fs.put(str(folder), f"{BUCKET}/photos", recursive=True)
            say(f"wrote {images} photo JPEGs ({jpeg_kb:.0f} KB on average) to disk and to S3")
            for where in (str(root / "shards"), f"s3://{BUCKET}/shards"):
                shards.pack_here(str(folder), where, images_per_shard)
            say(f"packed them into shards of {images_per_shard} images, on disk and on S3")

            def per_image(url: str) -> Callable[[], int]:
                train, _, _ = imagefolder.build(url, size, round(size / 0.875), True, seed)
                loader = DataLoader(train, batch_size=batch, shuffle=True, num_workers=0)
                return lambda: _count(loader)

            built = [0]

            def sharded(url: str, delay: int) -> Callable[[], int]:
                """Each round streams into an empty cache: one reader per round, opened (its
                index read) before the timing, as a training worker opens it once."""
                s3.delay_s = delay / 1000
                streams = []
                for _ in range(rounds):
                    built[0] += 1
                    train, _, _ = shards.build(
                        url,
                        size=size,
                        eval_resize=round(size / 0.875),
                        augment=True,
                        seed=seed,
                        per_worker_batch=batch,
                        cache=str(root / "cache" / str(built[0])),
                        cache_limit=None,
                        canonical_nodes=1,
                    )
                    train.start_epoch(0, 0)
                    streams.append(train)

                def read() -> int:
                    return _count(DataLoader(streams.pop(), batch_size=batch, num_workers=0))

                return read

            cpu: dict[int, list[float]] = {}  # id(read) -> this process's CPU s per image

            def at(delay: int, read: Callable[[], int]) -> Callable[[], int]:
                def timed() -> int:
                    s3.delay_s = delay / 1000
                    start = time.process_time()
                    done = read()
                    cpu.setdefault(id(timed), []).append((time.process_time() - start) / done)
                    return done

                return timed

            runs: dict[str, Callable[[], int]] = {
                "per-image, disk": at(0, per_image(str(folder))),
                "shards, disk": at(0, sharded(str(root / "shards"), 0)),
            }
            for delay in delays_ms:
                runs[f"per-image, S3 +{delay} ms"] = at(delay, per_image(f"s3://{BUCKET}/photos"))
                runs[f"shards, S3 +{delay} ms"] = at(delay, sharded(f"s3://{BUCKET}/shards", delay))
            rates = interleave(runs, rounds, say)
    finally:
        s3.close()
        if cores is not None:
            os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    medians = {name: statistics.median(r) for name, r in rates.items()}
    extra: dict[str, Any] = {f"{name} img/s": round(m, 1) for name, m in medians.items()}
    # Where the time goes: the reader's own CPU per image (its download threads included).
    extra |= {
        f"{name} reader CPU ms/img": round(1000 * statistics.median(cpu[id(run)]), 2)
        for name, run in runs.items()
    }
    for delay in delays_ms:
        ratio = medians[f"shards, S3 +{delay} ms"] / medians[f"per-image, S3 +{delay} ms"]
        extra[f"shards / per-image at +{delay} ms"] = round(ratio, 2)
    if 0 in delays_ms:
        extra["shards from S3 (+0 ms) / shards from disk"] = round(
            medians["shards, S3 +0 ms"] / medians["shards, disk"], 3
        )
    extra["jpeg_kb"] = round(jpeg_kb, 1)
    return Comparison(
        bench="input-storage",
        unit="img/s",
        baseline=Variant(
            "baseline",
            f"data.imagefolder, one GET per image, S3 +{delay_ms} ms a request",
            rates[f"per-image, S3 +{delay_ms} ms"],
        ),
        project=Variant(
            "project",
            f"data.shards (MosaicML Streaming, whole shards), S3 +{delay_ms} ms a request",
            rates[f"shards, S3 +{delay_ms} ms"],
        ),
        settings={
            "images": images,
            "size": size,
            "batch": batch,
            "images_per_shard": images_per_shard,
            "delays_ms": list(delays_ms),
            "rounds": rounds,
            "server_core": core,
        },
        extra=extra,
        notes=[
            "one process, no DataLoader workers, decode + RandomResizedCrop + flip at the size; "
            "wall-clock images/s, moto's S3 server in a second process"
            + (f", on core {core} alone (the reader on the others)" if core is not None else ""),
        ],
    )
