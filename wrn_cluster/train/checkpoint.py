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
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
