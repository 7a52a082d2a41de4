"""Compile a kernel's C source once per machine and instruction set, and load it with ctypes.

    GLM5_CPU_ISA=avx2 python ...     # force a path: avx512, avx2, neon or portable (one this CPU can run)

The instruction set is chosen from what the CPU reports (/proc/cpuinfo's flags, `sysctl` on macOS):
`avx512` (avx512f/bw/vl/dq), `avx2` (avx2 + fma), `neon` (AArch64) or `portable` (no ISA flags: SSE2 on
x86-64), and compiled for exactly that with explicit flags (never -march=native, so a forced `avx2` build on
an AVX-512 machine is the build an AVX2-only CPU runs). vec.h sizes its vectors to the ISA's registers.

The shared library lands in `$GLM5_CACHE/kernels/<name>-<isa>-<hash>.so` (default `~/.cache/glm5`); the hash
covers the source and the headers beside it, the compiler, its flags and the ISA, so an edited kernel never
reuses a stale build. It is written to a temporary name and renamed, so processes building at once (pytest
workers, torchrun ranks) never load a half-written file.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

ENV_SWITCH = "GLM5_CPU_KERNELS"  # "0", "false" or "off" turns every CPU kernel off
ISA_ENV = "GLM5_CPU_ISA"  # force one instruction-set path (tests run every path this CPU can execute)
ISAS = ("avx512", "avx2", "neon", "portable")  # best first
# the compiler flags of each path; x86 paths also need the CPU flags in ISA_NEEDS
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mbmi2"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2"],
    "neon": [],  # NEON is part of AArch64's base instruction set
    "portable": ["-DGLM5_PORTABLE"],  # vec.h's generic 4-float vectors, whatever the compiler targets
}
ISA_NEEDS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"), "avx2": ("avx2", "fma")}
_override: list[list[bool]] = []  # innermost use_cpu_kernels() wins; each block removes its own entry
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def cpu_kernels_enabled() -> bool:
    """Whether CPU kernels may run: `use_cpu_kernels(...)` if inside one, else not `GLM5_CPU_KERNELS=0`."""
    if _override:
        return _override[-1][0]
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def use_cpu_kernels(enabled: bool):
    """Turn the CPU kernels on or off inside a `with` block (this process, all threads)."""
    entry = [bool(enabled)]  # removed by identity: blocks in two threads may exit out of order
    _override.append(entry)
    try:
        yield
    finally:
        del _override[max(i for i, e in enumerate(_override) if e is entry)]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@cache
def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 9B14", "Apple M2"), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        out = _sysctl("machdep.cpu.brand_string")
        if out:
            return out
    return platform.processor() or platform.machine() or "unknown"


def _sysctl(*names: str) -> str:
    try:
        proc = subprocess.run(["sysctl", "-n", *names], capture_output=True, text=True, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@cache
def cpu_features() -> frozenset[str]:
    """The instruction-set flags the CPU reports, lower case (Linux /proc/cpuinfo; sysctl on macOS)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].lower().split())
    except OSError:
        pass
    if platform.system() == "Darwin":  # Intel Macs list AVX2, FMA, AVX512F ...; Apple silicon has none of these
        return frozenset(_sysctl("machdep.cpu.features", "machdep.cpu.leaf7_features").lower().split())
    return frozenset()


def available_isas() -> list[str]:
    """The kernel paths this CPU can execute, best first (always ends with "portable")."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ["neon", "portable"]
    if machine not in ("x86_64", "amd64", "x64"):
        return ["portable"]
    flags = cpu_features()
    return [isa for isa in ("avx512", "avx2") if all(f in flags for f in ISA_NEEDS[isa])] + ["portable"]


def selected_isa() -> tuple[str, str]:
    """(the ISA path the kernels are built for, why). `GLM5_CPU_ISA` picks one the CPU can run; a name this
    CPU cannot execute falls back to the best it can (with a warning); an unknown name is a ValueError."""
    available = available_isas()
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if forced and forced != "auto":
        if forced not in ISAS:
            raise ValueError(f"{ISA_ENV}={forced!r}: expected one of {', '.join(ISAS)} or auto")
        if forced in available:
            return forced, f"forced by {ISA_ENV}={forced}"
        _warn_once(f"glm5.kernels: {ISA_ENV}={forced} but this CPU cannot execute it; using {available[0]}")
        return available[0], f"{ISA_ENV}={forced} is not executable here (CPU has {', '.join(available)})"
    best = available[0]
    if best in ISA_NEEDS:
        return best, "the CPU reports " + ", ".join(ISA_NEEDS[best])
    if best == "neon":
        return best, f"AArch64 CPU ({platform.machine()})"
    return best, "no AVX2 + FMA or NEON reported by the CPU"


@cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def _compile(cc: str, source: Path, target: Path, flags: list[str]) -> str | None:
    """Build source -> target; None on success, else the compiler's message."""
    try:  # an unwritable cache (read-only home, GLM5_CACHE elsewhere) is a failed build: the fallback runs
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        return str(exc)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(source), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip()[-2000:] or f"{cc} exit status {proc.returncode}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def _load(name: str, cache_root: str, isa: str, openmp: bool = True) -> ctypes.CDLL | None:
    """The library of `name` built for `isa` (flags ISA_FLAGS[isa]); openmp=False: no -fopenmp (what a
    compiler without OpenMP builds: the caller's thread pool runs the jobs)."""
    source = Path(__file__).with_name(f"{name}.c")
    cc = _compiler()
    if cc is None:
        warnings.warn(f"glm5.kernels: no C compiler found (set CC); {name} runs its PyTorch fallback", stacklevel=3)
        return None
    base = ["-O3", "-std=gnu11", "-shared", "-fPIC", *ISA_FLAGS[isa]]
    errors = []
    # -fopenmp: the kernels' threads become torch's own OpenMP workers (the library binds to the libgomp.so.1
    # torch loaded); a compiler without OpenMP builds the next variant and the caller threads the jobs itself
    variants = [base + ["-fopenmp"], base] if openmp else [base]
    for flags in variants:
        digest = hashlib.sha256()
        headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # vec.h: an edit rebuilds all
        for part in (source.read_bytes(), *headers, cc.encode(), " ".join(flags).encode(), isa.encode(),
                     platform.machine().encode()):
            digest.update(part + b"\0")
        target = Path(cache_root) / "kernels" / f"{name}-{isa}-{digest.hexdigest()[:16]}.so"
        if not target.exists():
            error = _compile(cc, source, target, flags)
            if error is not None:
                errors.append(error)
                continue
        try:
            return ctypes.CDLL(str(target))
        except OSError as exc:
            errors.append(str(exc))
    warnings.warn(f"glm5.kernels: could not build {name} for {isa} ({errors[-1][:300]}); its PyTorch fallback runs",
                  stacklevel=3)
    return None


def load_library(name: str) -> ctypes.CDLL | None:
    """The compiled `glm5/kernels/<name>.c` for the selected ISA (built on first call), or None when CPU
    kernels are off or it cannot be built (a warning says why, once)."""
    if not cpu_kernels_enabled():
        return None
    # what decides the library: the forced ISA and the cache directory (both from the environment); a
    # dictionary lookup on them keeps per-call costs (decode-sized kernels) off the ISA and path resolution
    key = (name, os.environ.get(ISA_ENV), os.environ.get("GLM5_CACHE"))
    lib = _libraries.get(key)
    if lib is not None:
        return lib
    from glm5.common import cache_dir

    isa = selected_isa()[0]
    with _lock:  # one build per process even when threads ask at once
        lib = _load(name, str(cache_dir()), isa)
    if lib is not None:  # (a failure is remembered by _load, which warned once)
        _libraries[key] = lib
    return lib


_bound: dict[int, tuple[ctypes.CDLL, object]] = {}
_libraries: dict[tuple, ctypes.CDLL] = {}  # libraries loaded, by (name, forced ISA, cache dir)


def bound_functions(lib: ctypes.CDLL, bind_all):
    """bind_all(lib) -> the library's functions with their argtypes, once per loaded library (one per ISA)."""
    entry = _bound.get(id(lib))
    if entry is None or entry[0] is not lib:
        # the entry holds the library itself, so its id can never be reused by another while it is here
        entry = _bound[id(lib)] = (lib, bind_all(lib))
    return entry[1]


def library_isa(lib: ctypes.CDLL) -> tuple[str, int]:
    """(the ISA a library was compiled for, floats per vector), as the library itself reports it."""
    isa, width = lib.glm5_isa, lib.glm5_vector_floats
    isa.restype, width.restype = ctypes.c_char_p, ctypes.c_int
    return isa().decode(), width()


def run_threads(fn, jobs: list[tuple]) -> list:
    """fn(*job) for every job, on up to len(jobs) threads at once; results in order. ctypes releases the GIL
    while a C function runs, so the jobs run in parallel (callers size jobs to torch.get_num_threads())."""
    global _pool
    if len(jobs) == 1:
        return [fn(*jobs[0])]
    with _lock:
        if _pool is None or _pool._max_workers < len(jobs):
            _pool = ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="glm5-kernel")
        pool = _pool
    return list(pool.map(lambda job: fn(*job), jobs))


def has_openmp(lib: ctypes.CDLL) -> bool:
    """Whether a kernel library was built with OpenMP (its *_jobs entry points then run in parallel)."""
    fn = getattr(lib, "glm5_openmp", None)
    return bool(fn is not None and fn())


def int64_array(values) -> ctypes.Array:
    values = list(values)
    return (ctypes.c_int64 * len(values))(*values)


def pointer_array(pointers) -> ctypes.Array:
    pointers = list(pointers)
    return (ctypes.c_void_p * len(pointers))(*pointers)


def bind(lib: ctypes.CDLL, name: str, argtypes: list, restype, range_at: int):
    """`glm5_<name>` with its argtypes, and its OpenMP twin `glm5_<name>_jobs` (None without OpenMP), whose
    two range arguments at `range_at` (begin, end) are a bounds array and a job count instead."""
    fn = getattr(lib, f"glm5_{name}")
    fn.argtypes, fn.restype = argtypes, restype
    jobs = None
    if has_openmp(lib):
        jobs = getattr(lib, f"glm5_{name}_jobs")
        jobs.argtypes = argtypes[:range_at] + [ctypes.c_void_p, ctypes.c_int64] + argtypes[range_at + 2 :]
        jobs.restype = restype
    return fn, jobs


def grad_wanted(*tensors) -> bool:
    """Whether autograd records an op on these tensors (a kernel then runs as an autograd Function)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def split_range(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) as up to `parts` contiguous, non-empty, nearly equal (begin, end) ranges."""
    bounds = [n * t // parts for t in range(parts + 1)]
    return [(bounds[t], bounds[t + 1]) for t in range(parts) if bounds[t] < bounds[t + 1]]


def run_ranges(fn, jobs_fn, head: tuple, ranges: list[tuple[int, int]], tail: tuple = (), per_job: list | None = None):
    """Run a kernel over (begin, end) ranges: its OpenMP twin `jobs_fn` once with the bounds (the ranges must
    meet end to end), else `fn` once per range on the thread pool. per_job: one pointer per range (each job's
    own output buffer), passed as an array to the twin or one by one to `fn`, after `tail`.
    -> the return codes (one for the twin)."""
    if not ranges:
        return []
    if jobs_fn is not None:
        bounds = int64_array([a for a, _ in ranges] + [ranges[-1][1]])
        extra = () if per_job is None else (pointer_array(per_job),)
        return [jobs_fn(*head, bounds, len(ranges), *tail, *extra)]
    return run_threads(fn, [head + (a, b) + tail + (() if per_job is None else (per_job[t],))
                            for t, (a, b) in enumerate(ranges)])
