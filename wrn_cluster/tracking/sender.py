"""The metric sender: a background thread that batches a run's metrics to MLflow, so logging
every step costs the step an append, and an unreachable server costs training nothing."""

from __future__ import annotations

import collections
import logging
import threading
import time
import warnings
from typing import TYPE_CHECKING

from wrn_cluster.tracking.server import redacted

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

log = logging.getLogger(__name__)
# How many metric values wait for an unreachable server before the oldest are dropped.
BUFFER_LIMIT = 100_000
BATCH_LIMIT = 1000  # MLflow's most metrics per log_batch


class MetricSender:
    """Sends metrics from a background thread in batches: one request per ``flush_s``, sooner
    only when BATCH_LIMIT values wait (so logging every step costs the step nothing but an
    append); keeps them while the server is unreachable (bounded), warns once, and sends them
    when it answers again."""

    def __init__(
        self, client: MlflowClient, run_id: str, retry_s: float = 2.0, flush_s: float = 1.0
    ) -> None:
        self.client, self.run_id, self.retry_s, self.flush_s = client, run_id, retry_s, flush_s
        self.pending: collections.deque = collections.deque(maxlen=BUFFER_LIMIT)
        self.dropped = 0
        self.warned = False
        self.lock = threading.Condition()
        self.closing = False
        self.deadline = float("inf")
        self.thread = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def add(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self.lock:
            was_empty = not self.pending
            for key, value in metrics.items():
                if len(self.pending) == self.pending.maxlen:
                    self.dropped += 1
                self.pending.append(Metric(key, float(value), now, step))
            if was_empty or len(self.pending) >= BATCH_LIMIT:
                self.lock.notify()

    def _next_batch(self, last_sent: float) -> list[Metric] | None:
        """Wait until a batch is due (a full one, flush_s since the last send, or closing);
        None when closing with nothing left."""
        with self.lock:
            while not self.closing:
                waited = time.monotonic() - last_sent
                if self.pending and (len(self.pending) >= BATCH_LIMIT or waited >= self.flush_s):
                    break
                self.lock.wait(self.flush_s - waited if self.pending else None)
            if not self.pending:
                return None
            return [self.pending[i] for i in range(min(len(self.pending), BATCH_LIMIT))]

    def _send_loop(self) -> None:
        last_sent = 0.0
        while (batch := self._next_batch(last_sent)) is not None:
            last_sent = time.monotonic()
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception as error:  # any transport or server error: keep and retry
                if not self.warned:
                    self.warned = True
                    warnings.warn(
                        f"MLflow at {redacted(self.client.tracking_uri)} is not answering "
                        f"({error}); training goes on and metrics are kept until it is back",
                        stacklevel=1,
                    )
                with self.lock:
                    if self.closing and time.monotonic() > self.deadline:
                        return
                time.sleep(self.retry_s)
                continue
            with self.lock:
                for sent in batch:  # a full buffer may have dropped some of them meanwhile
                    if self.pending and self.pending[0] is sent:
                        self.pending.popleft()
                if self.warned and not self.pending:
                    log.warning("MLflow is back; buffered metrics sent")
                    self.warned = False

    def close(self, timeout_s: float = 60.0) -> int:
        """Flush what is left; return how many values could not be sent."""
        with self.lock:
            self.closing = True
            self.deadline = time.monotonic() + timeout_s
            self.lock.notify()
        self.thread.join(timeout_s + self.retry_s + 5)
        return len(self.pending) + self.dropped
