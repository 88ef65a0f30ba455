"""Per-epoch training checkpoints: everything needed to continue a run exactly.

As in torchvision's reference scripts, the checkpoint holds model, optimizer,
scheduler and epoch; for an *exact* continuation it also holds the AMP scaler,
the sampler state, the RNG states (Python, NumPy, torch CPU/CUDA, per DDP rank),
the best metric so far, the early-stopping counter and the per-epoch history
(so the DVCLive curves can be rewritten whole after a resume). Writes are atomic
(temp file + ``os.replace``): a SIGKILL during the write leaves the previous
checkpoint intact. Everything is tensors and primitives, readable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bonefrac.atomic import atomic_write_bytes
from bonefrac.errors import BonefracError

CHECKPOINT_FORMAT = "bonefrac-checkpoint/1"


class CheckpointError(BonefracError, RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (tagged with the checkpoint format) to ``path``."""
    buf = io.BytesIO()  # in memory: torch.save would name the archive after the random temp file
    torch.save({**state, "format": CHECKPOINT_FORMAT}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a bonefrac training checkpoint")
    return state
