"""A linear layer on a few rows (decode and speculative verify steps) on a CPU in fp32 (`linear.c`).

    y = linear_rows(x, weight)    # x [N, H], weight [O, H] -> x @ weight.T [N, O]; None: cannot run here

Each block of the weight's rows is read once for all N rows (N <= MAX_ROWS), where BLAS's GEMM for 2-3 rows
reads the weight several times slower than its one-row GEMV (linear.c's docstring has the figures). The engine's
`linear` (glm5/engine/runner.py) calls it through the startup check (glm5.kernels.check), so it runs only
on shapes where it beats F.linear (its fallback and test reference) on this machine.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from glm5.kernels.build import bind, bound_functions, int64_array, load_library, run_ranges, split_range

MAX_ROWS = 16  # decode and verify steps; more rows are a matmul's job
JOB_BYTES_MIN = 256 * 1024  # weight bytes a thread reads: below this a second thread costs more than it saves


def _bind(lib: ctypes.CDLL) -> dict:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn, jobs = bind(lib, "linear_rows", [p, i64, i64, p, i64, i64, i64, i64, p], None, 6)
    return {"linear_rows": fn, "linear_rows_jobs": jobs}


def _kernels():
    lib = load_library("linear")
    return None if lib is None else bound_functions(lib, _bind)


def available() -> bool:
    """Whether the kernel library loads here (builds it on the first call)."""
    return _kernels() is not None


@functools.cache
def _jobs(O: int, H: int, threads: int) -> tuple[int, ctypes.Array]:
    """The outputs split over up to `threads` jobs at multiples of 4 (the kernel's output block), as the job
    count and the bounds array the kernel's OpenMP entry point takes (cached: decode calls the same shapes)."""
    blocks = -(-O // 4)
    parts = max(1, min(threads, blocks, 4 * O * H // JOB_BYTES_MIN))
    ranges = [(4 * a, min(O, 4 * b)) for a, b in split_range(blocks, parts)]
    return len(ranges), int64_array([a for a, _ in ranges] + [ranges[-1][1]])


def linear_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x [N, H] fp32 (N <= MAX_ROWS), weight [O, H] fp32 -> x @ weight.T [N, O]; None when the kernel
    cannot run on these inputs (another dtype or device, autograd, too many rows, no compiler)."""
    if (x.dim() != 2 or weight.dim() != 2 or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.device.type != "cpu" or weight.device.type != "cpu" or not 0 < x.shape[0] <= MAX_ROWS
            or x.shape[1] != weight.shape[1] or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    kernels = _kernels()
    if kernels is None:
        return None
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    N, H = x.shape
    O = weight.shape[0]
    y = torch.empty(N, O, dtype=torch.float32)
    head = (x.data_ptr(), N, x.stride(0), weight.data_ptr(), O, H)
    jobs, bounds = _jobs(O, H, torch.get_num_threads())
    jobs_fn = kernels["linear_rows_jobs"]
    if jobs_fn is None:  # no OpenMP: the thread pool runs the slices
        run_ranges(kernels["linear_rows"], None, head, [(bounds[j], bounds[j + 1]) for j in range(jobs)],
                   (y.data_ptr(),))
    else:
        jobs_fn(*head, bounds, jobs, y.data_ptr())
    return y
