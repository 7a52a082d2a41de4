"""Small shared helpers: device and dtype pick, rank-0 printing, the cache folder, argparse integer types.

Imports only the standard library at import time (torch inside the functions that need it), so the CLI can
register every subcommand's parser, and `glm5 --help` answer, without loading torch; glm5.kernels and
glm5.tokenizer both take `cache_dir` from here rather than one importing the other.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# dtype names accepted on command lines and in configs -> torch attribute names
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def cache_dir() -> Path:
    """Where glm5 caches what it builds (tokenizers; compiled CPU kernels, glm5.kernels): `$GLM5_CACHE`, else
    `~/.cache/glm5`."""
    return Path(os.environ.get("GLM5_CACHE") or Path.home() / ".cache" / "glm5")


def int_at_least(low: int, high: int | None = None):
    """An argparse `type` for subcommands: an integer in [low, high], else argparse's one-line usage error."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value}: must be >= {low}" + (f" and <= {high}" if high is not None else ""))
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given, else cuda, then mps, then cpu."""
    import torch

    if name and name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name!r}: not a device (cpu, cuda, cuda:N, mps, auto)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: CUDA is not available here (torch {torch.__version__})")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[name])


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (every process under torchrun would otherwise repeat it)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing large blocks back to the OS.

    By default every allocation above 32 MB is a fresh mmap, so a training step's big tensors (logits
    [rows, vocab], attention scores) page-fault on every step; measured 4-10% of a CPU training step
    (dev/LOG.md). Training and benchmark processes call this once at start; memory then stays at its peak.
    Returns False (and changes nothing) off glibc."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
