"""The startup check: a CPU kernel runs only where it beats the PyTorch code it replaces, on this machine.

    out = kernel_or_fallback("indexer_topk", shape_class, fast, fallback)   # fast() may return None

The first call of a (kernel, shape class) on a machine runs both on the call's own inputs (so the check costs
no synthetic work, and measures the shape that matters): the kernel once untimed (it may be building its
library), then the fallback and the kernel alternated, twice each when they are short, minimum of each. The faster one is remembered in memory and in
`$GLM5_CACHE/kernels/checks-<hash>.json` (hash: the kernel sources, the ISA path, the CPU, torch's version
and the thread count), so later calls and later processes pay nothing but a dictionary lookup. Shape classes
round sizes up to powers of two (a few classes per model). Both paths compute the same numbers (tested), so
either answer is correct; the check only picks the faster.

With autograd the forward alone is timed (the kernels' backwards follow their forwards' choice).
Under torch.compile the fallback is traced (inductor generates its own fused code; a ctypes call would
break the graph). `GLM5_KERNEL_CHECK=0` skips the check: a kernel runs wherever it can (the kernel tests use it, so they test
the kernel whichever path wins here). `python -m glm5.kernels` prints the decisions.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TypeVar

import torch

from glm5.kernels.build import ISA_ENV, cpu_features, cpu_kernels_enabled, cpu_model, selected_isa

CHECK_ENV = "GLM5_KERNEL_CHECK"  # "0": no timing check, every kernel runs where it can
SHORT_S = 0.05  # calls shorter than this are timed twice each (alternated) and the minimum kept
R = TypeVar("R")

_decisions: dict[str, dict] = {}  # class key -> {"kernel": bool, "kernel_ms": .., "fallback_ms": ..}
_loaded: set[str] = set()  # check files already read into _decisions
_lock = threading.Lock()
_files: dict[tuple, Path] = {}  # (forced ISA, GLM5_CACHE, HOME, threads) -> the check file


def check_enabled() -> bool:
    return os.environ.get(CHECK_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def size_class(n: int) -> int:
    """n rounded up to a power of two (0 stays 0): shapes in one class share one decision."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def _check_file() -> Path:
    # what decides the file: the forced ISA, the cache directory (both from the environment) and the thread
    # count; a dictionary lookup on them keeps the per-call cost of a decode-sized kernel at a few microseconds
    # (resolving the ISA and the path each time cost ~20 us a call)
    env = os.environ
    key = (env.get(ISA_ENV), env.get("GLM5_CACHE"), env.get("HOME"), torch.get_num_threads())
    path = _files.get(key)
    if path is None:
        from glm5.common import cache_dir

        path = _files[key] = _check_file_for(selected_isa()[0], key[3], str(cache_dir()))
    return path


@cache
def _check_file_for(isa: str, threads: int, cache_root: str) -> Path:
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for source in sorted([*here.glob("*.c"), *here.glob("*.h")]):
        digest.update(source.read_bytes())
    for part in (isa, cpu_model(), " ".join(sorted(cpu_features())), torch.__version__, str(threads)):
        digest.update(part.encode() + b"\0")
    return Path(cache_root) / "kernels" / f"checks-{isa}-{digest.hexdigest()[:16]}.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or unreadable (a half-written file cannot exist: writes are atomic): measure again


def _write(path: Path, key: str, decision: dict) -> None:
    """Merge one decision into the file (read again first: other processes may have added theirs); atomic."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[key] = decision
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache: the decision still holds for this process


def _key(kernel: str, shape_class: tuple) -> tuple[Path, str]:
    path = _check_file()
    return path, f"{kernel}|" + "|".join(str(part) for part in shape_class)


def decision(kernel: str, shape_class: tuple) -> dict | None:
    """The recorded decision for a kernel and shape class on this machine, or None if not measured yet."""
    path, key = _key(kernel, shape_class)
    with _lock:
        if str(path) not in _loaded:
            _loaded.add(str(path))
            for k, v in _read(path).items():
                _decisions.setdefault(f"{path}::{k}", v)
        return _decisions.get(f"{path}::{key}")


def record(kernel: str, shape_class: tuple, kernel_s: float, fallback_s: float) -> dict:
    path, key = _key(kernel, shape_class)
    entry = {"kernel": kernel_s <= fallback_s, "kernel_ms": round(kernel_s * 1e3, 4),
             "fallback_ms": round(fallback_s * 1e3, 4)}
    with _lock:
        _decisions[f"{path}::{key}"] = entry
    _write(path, key, entry)
    return entry


def decisions() -> dict[str, dict]:
    """Every decision recorded for this machine, ISA and thread count: {"kernel|class": {...}}."""
    path = _check_file()
    return _read(path)


def _timed(fn: Callable[[], R]) -> tuple[R, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def kernel_or_fallback(kernel: str, shape_class: tuple, fast: Callable[[], R | None], fallback: Callable[[], R]) -> R:
    """fast()'s result where the kernel wins (or the check is off), else fallback()'s. fast() returns None
    when the kernel cannot run (kernels off, no compiler, unsupported input): the fallback runs, nothing is
    recorded."""
    if not cpu_kernels_enabled() or torch.compiler.is_compiling():
        # under torch.compile the PyTorch code is what inductor fuses; a ctypes call would break the graph
        return fallback()
    if not check_enabled():
        out = fast()
        return fallback() if out is None else out
    known = decision(kernel, shape_class)
    if known is not None:
        if not known["kernel"]:
            return fallback()
        out = fast()
        return fallback() if out is None else out
    out = fast()  # the first call also builds the library (seconds): not timed
    if out is None:
        return fallback()
    fallback_s = _timed(fallback)[1]
    kernel_s = _timed(fast)[1]
    if max(kernel_s, fallback_s) < SHORT_S:  # short calls: a second round, alternated, the minimum of each
        fallback_s = min(fallback_s, _timed(fallback)[1])
        kernel_s = min(kernel_s, _timed(fast)[1])
    record(kernel, shape_class, kernel_s, fallback_s)
    return out
