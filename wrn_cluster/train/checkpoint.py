"""What a checkpoint holds, so that a resumed run continues exactly where it stopped."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"


class CheckpointMismatchError(RuntimeError):
    """A checkpoint written for another network than the one the spec asks for."""


def rng_state() -> dict[str, Any]:
    """This process's random streams as plain Python values (bytes, ints), which both
    torch.distributed's object gather and torch.load(weights_only=True) accept."""
    kind, keys, *rest = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), *rest),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_byte_tensor(state["torch"]))
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    path = Path(directory) / STATE_FILE
    torch.save(state, path)
    return path


def load(directory: str | Path, arch: str, num_classes: int) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True, refusing one made for another network."""
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    if (state["arch"], state["num_classes"]) != (arch, num_classes):
        raise CheckpointMismatchError(
            f"the checkpoint in {directory} holds {state['arch']} with {state['num_classes']} "
            f"classes, but the spec asks for {arch} with {num_classes}; use another job name "
            "or checkpoint.storage to start fresh"
        )
    return state
