"""What a job on the embedded Ray prints: the project's lines on the console, every line in the
job's log file.

While the job runs, this process's standard output and error (file descriptors 1 and 2, so the
lines Ray forwards from the Train controller and workers, Python's warnings and logging, and
C++ writes alike) go through two pipes, each read by a thread. Every line is appended to the
log file as it came. A line also reaches the console when it is the project's: after Ray's
``(TrainController pid=N)`` prefix and colour codes are taken off, it starts with ``[NAME]`` (the
job's own lines, printed by the driver, the controller or rank 0) or ``[NAME-`` (a search's
trials), or with ``warning:`` or ``error:``. What the launcher says itself (``say``) goes to both
directly. On a terminal, rank 0's lines inside an epoch move a progress bar (rich) instead of
scrolling. ``verbose`` shows every line on the console as Ray prints it. ``FollowedLog`` applies
the same rule to a cluster job's log that `submit` follows.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import IO

# Ray's prefix on a forwarded line: "(TrainController pid=8123)" or "(RayTrainWorker pid=8270,
# ip=10.0.0.2)", coloured when Ray thinks it writes to a terminal.
_COLOUR = r"(?:\x1b\[[0-9;]*m)*"
RAY_PREFIX = re.compile(rf"^{_COLOUR}\([^()]*\bpid=\d+[^()]*\){_COLOUR} ?")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Rank 0's line inside an epoch (train.metrics.InEpoch), which a terminal shows as a bar.
IN_EPOCH = re.compile(
    r"^(?P<name>\[[^\]]+\] epoch \d+/\d+) step (?P<step>\d+)/(?P<steps>\d+) \(\d+%\)  "
    r"(?P<rest>.*)$"
)


# Python's line for a warnings.warn of the project's own code (in the driver or a worker).
OWN_WARNING = re.compile(r"^\S*/wrn_cluster/\S+\.py:\d+: \w*Warning: (?P<message>.*)$")


def plain(line: str) -> str:
    """A line without Ray's source prefix and without terminal colour codes; the project's
    own Python warnings as ``warning: MESSAGE``."""
    text = ANSI.sub("", RAY_PREFIX.sub("", line, count=1))
    own = OWN_WARNING.match(text)
    return f"warning: {own['message']}\n" if own else text


def is_projects(line: str, job_name: str) -> bool:
    """Whether a line (as printed, prefix and colours included) is one of the project's."""
    return plain(line).startswith((f"[{job_name}]", f"[{job_name}-", "warning: ", "error: "))


def log_path(home: Path, job_id: str) -> Path:
    """Where the embedded job ``job_id`` keeps its whole output."""
    return home / "logs" / f"{job_id}.log"


class JobConsole:
    """Routes this process's output for the length of a ``with`` block (see the module's
    docstring). ``to`` is the console stream the project's lines go to: stderr when stdout is
    kept for a JSON answer."""

    def __init__(self, job_name: str, log_file: Path, verbose: bool = False, to: str = "stdout"):
        self.job_name, self.log_file, self.verbose = job_name, log_file, verbose
        self.to = to
        self._log: IO[bytes] | None = None
        self._lock = threading.Lock()
        self._saved: dict[int, int] = {}
        self._readers: list[threading.Thread] = []
        self._bar = None  # a rich Progress on a terminal
        self._task = None

    @property
    def on_terminal(self) -> bool:
        """Whether the project's lines go to a terminal (then rank 0's lines inside an epoch
        drive a progress bar)."""
        fd = 2 if self.to == "stderr" else 1
        return not self.verbose and os.isatty(self._real(fd))

    def __enter__(self) -> JobConsole:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "ab", buffering=0)  # noqa: SIM115 (closed in __exit__)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"--- {stamp} {' '.join(sys.argv)}\n".encode())
        _flush_std()
        for fd in (1, 2):
            self._saved[fd] = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            reader = threading.Thread(
                target=self._pump, args=(read_end, fd), name=f"wrn-console-{fd}", daemon=True
            )
            reader.start()
            self._readers.append(reader)
        if self.on_terminal:
            self._start_bar()
        return self

    def __exit__(self, *exc) -> None:
        _flush_std()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # closes the pipe's last write end this process holds
        # A child that inherited a write end (and outlives the job) must not hold us up.
        for reader in self._readers:
            reader.join(timeout=5)
        with self._lock:  # a reader still running (a child holds a pipe) stops logging
            for saved in self._saved.values():
                os.close(saved)
            self._saved.clear()
            log, self._log = self._log, None
        if log:
            log.close()

    def say(self, text: str) -> None:
        """One of the project's lines, from this process: to the console and the log."""
        data = (text.rstrip("\n") + "\n").encode()
        with self._lock:
            self._show(data, 2 if self.to == "stderr" else 1)
            if self._log:
                with contextlib.suppress(OSError, ValueError):
                    self._log.write(data)

    def _real(self, fd: int) -> int:
        """The console behind stdout (1) or stderr (2), while they point at the pipes."""
        return self._saved.get(fd, fd)

    def _pump(self, read_end: int, fd: int) -> None:
        pending = b""
        with open(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._route(line + b"\n", fd)
        if pending:
            self._route(pending + b"\n", fd)

    def _route(self, data: bytes, fd: int) -> None:
        text = data.decode(errors="replace")
        with self._lock:
            if self._log:
                # A full disk must not stop the draining: the pipes would fill and block the
                # job's every print.
                with contextlib.suppress(OSError, ValueError):
                    self._log.write(data)
            shown = data if self.verbose else None
            if shown is None and is_projects(text, self.job_name):
                shown = plain(text).encode()
            if shown is not None:
                # A project's line on stderr (a warning) stays there; stdout's go where ``to``
                # says.
                self._show(shown, 2 if fd == 2 or self.to == "stderr" else 1)

    def _show(self, data: bytes, fd: int) -> None:
        """On the console: above the bar when there is one; rank 0's line inside an epoch
        moves the bar instead."""
        if self._bar is None:
            with contextlib.suppress(OSError):
                os.write(self._real(fd), data)
            return
        text = data.decode(errors="replace").rstrip("\n")
        found = IN_EPOCH.match(text)
        if found:
            self._bar.update(
                self._task,
                description=found["name"],
                completed=int(found["step"]),
                total=int(found["steps"]),
                rest=found["rest"],
                visible=True,
            )
        else:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        fd = 2 if self.to == "stderr" else 1
        terminal = open(os.dup(self._real(fd)), "w", buffering=1)  # noqa: SIM115 (rich's)
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rest]}"),
            console=Console(file=terminal, force_terminal=True, highlight=False),
            transient=True,
            redirect_stdout=False,  # this process's output goes through the pipes, not rich
            redirect_stderr=False,
        )
        self._task = self._bar.add_task("", total=None, rest="", visible=False)
        self._bar.start()


class FollowedLog:
    """A cluster job's log as `submit` follows it through the Jobs API: the chunks the API
    sends are cut into lines; every line goes to the local log file, the project's lines (the
    same rule as above) to ``show``, and every line there too when ``verbose``."""

    def __init__(self, job_name: str, log_file: Path, show, verbose: bool = False) -> None:
        self.job_name, self.show, self.verbose = job_name, show, verbose
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_file, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._pending = ""

    def write(self, text: str) -> None:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._line(line + "\n")

    def close(self) -> None:
        if self._pending:
            self._line(self._pending + "\n")
            self._pending = ""
        self._log.close()

    def _line(self, line: str) -> None:
        self._log.write(line)
        self._log.flush()
        if self.verbose:
            self.show(line)
        elif is_projects(line, self.job_name):
            self.show(plain(line))


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
