"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and primitive types: model state (parameters and buffers, which
include memory banks), optimiser and grad-scaler state, the method's ``extra_state()`` (queues,
cluster labels, ...), RNG states (python, numpy, torch, CUDA; one set per rank), the sampler's
(epoch, position), the step counters and the config.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgcl.utils.atomic import atomic_path, ensure_free_space

LAST_NAME = "last.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or cannot be read (the message names the file)."""


def capture_rng() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors and primitives."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (a crash never leaves a half-written checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(path.parent, _tensor_bytes(state))  # a clear error, not torch's on a full disk
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors and arrays in a nested state (what a checkpoint file mostly holds)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing file to --resume "
                              "(or omit it to auto-resume from <out>/checkpoints/last.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                              "it is corrupt or not an sgcl checkpoint; resume from another one") from None


def find_resume(out_dir: str | Path, resume: str | None, auto: bool = True) -> Path | None:
    """The checkpoint to resume from: ``resume`` if given (must exist), else ``out_dir/checkpoints/last.pt``."""
    if resume:
        path = Path(resume)
        if path.is_dir():
            path = path / "checkpoints" / LAST_NAME if (path / "checkpoints").is_dir() else path / LAST_NAME
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist; pass an existing file to --resume "
                                  "(or omit it to auto-resume from <out>/checkpoints/last.pt)")
        return path
    last = Path(out_dir) / "checkpoints" / LAST_NAME
    return last if auto and last.is_file() else None
