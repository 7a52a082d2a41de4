"""Training checkpoints: model, optimizer, schedule step, data position and RNG states in one file, written
atomically (a temporary file, then a rename) so a run killed mid-write never leaves a half checkpoint.

    save_checkpoint(directory, step, state, keep_last=2)    # -> directory/step_000100.pt, older ones pruned
    path = latest_checkpoint(directory)                     # None when there is none
    state = load_checkpoint(path)                           # ValueError naming the file when it is corrupt

These are for resuming a run. The model a run produces is written separately with
`GLM5ForCausalLM.save_pretrained` (Hugging Face safetensors), which the engine and server load.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import torch

PATTERN = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first (temporary files of an interrupted write are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    files = checkpoint_files(directory)
    return files[-1] if files else None


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict, keep_last: int = 2) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:06d}.pt"
    tmp = directory / f".{path.name}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if keep_last > 0:
        for old in checkpoint_files(directory)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint; a truncated or foreign file is a ValueError that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged zip/pickle
        raise ValueError(f"corrupt checkpoint {path}: {type(err).__name__}: {str(err)[:200]}") from None
    required = ("model", "optimizer", "step", "stage", "data", "rng")
    if not isinstance(state, dict) or any(key not in state for key in required):
        raise ValueError(f"corrupt checkpoint {path}: missing {[k for k in required if k not in (state or {})]}")
    return state


def rng_state() -> dict:
    """Every RNG a training step can touch (torch CPU, CUDA when present, Python's)."""
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
