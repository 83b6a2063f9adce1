"""Checkpoint files: atomic writes, loads that name the bad path, and RNG capture."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not ours; the message names the path."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` via a temp file in the same folder and ``os.replace``.

    A crash mid-write leaves the previous checkpoint intact: the rename is atomic on POSIX
    and Windows as long as both names live on one file system, hence the same folder.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format_version": FORMAT_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with errors that name the path."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint {str(source)!r} does not exist; check the path passed to load()")
    try:
        # our checkpoints hold numpy arrays and pickled env states, so a full unpickle is needed:
        # load only files you wrote yourself, as with any pickle
        state = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {str(source)!r} is corrupt or not a checkpoint ({type(error).__name__}: {error}); "
            "it was probably cut off mid-copy: use an earlier checkpoint"
        ) from error
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(source)!r} was not written by agents.PPO.save (format_version "
            f"{state.get('format_version') if isinstance(state, dict) else None!r}, expected {FORMAT_VERSION})"
        )
    return state


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a run draws from, so that a resumed run draws the same numbers."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
