"""The routed experts on a few rows (decode steps) on a CPU in fp32 (`experts.c`), for glm5.model.experts.

    out = experts_rows(x, indices, weights, gate_up, down)   # None: not CPU fp32, kernels off, no compiler

Each expert that some row picked reads its weights once and applies them to all its rows (the module
docstring of experts.c says why); `experts_rows_reference` is the same sums in PyTorch. A compiled step
(glm5/engine/compiled.py) does not call it: inductor fuses the gathered form into one loop that reads the
same bytes, and a call out of the compiled step costs more than it saves (dev/LOG.md).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from glm5.kernels.build import bind, bound_functions, load_library, pointer_array, run_ranges, split_range

MAX_ROWS = 16  # the kernel's use: decode steps (a larger batch is a matmul's job)


def _bind(lib: ctypes.CDLL) -> dict:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn, jobs = bind(lib, "experts_rows", [p, p, i64, i64, p, p, i64, i64, i64, i64, i64, p], ctypes.c_int, 9)
    combine = lib.glm5_experts_rows_combine
    combine.argtypes, combine.restype = [p, i64, p, i64, i64, i64, i64, p], None
    return {"experts_rows": fn, "experts_rows_jobs": jobs, "combine": combine}


def _kernels():
    lib = load_library("experts")
    return None if lib is None else bound_functions(lib, _bind)


def available() -> bool:
    """Whether the kernel library loads here (builds it on the first call)."""
    return _kernels() is not None


def _slices(I: int) -> list[tuple[int, int]]:
    """The intermediate dimension split over the threads at multiples of 16 floats (whole vectors)."""
    blocks = -(-I // 16)
    parts = max(1, min(torch.get_num_threads(), blocks))
    return [(16 * a, min(I, 16 * b)) for a, b in split_range(blocks, parts)]


def experts_rows(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor) -> torch.Tensor | None:
    """x [N, H] fp32, indices [N, k] int64, weights [N, k] fp32, gate_up [E, 2I, H], down [E, H, I] ->
    sum_k weights * expert_k(x) [N, H]; None when the kernel cannot run on these inputs."""
    tensors = (x, weights, gate_up, down)
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) or indices.device.type != "cpu":
        return None
    kernels = _kernels()
    if kernels is None:
        return None
    x, weights, gate_up, down = (t.contiguous() for t in tensors)
    indices = indices.to(torch.int64).contiguous()
    N, k = indices.shape
    E, two_i, H = gate_up.shape
    I = two_i // 2
    ranges = _slices(I)
    partials = torch.empty(len(ranges), N * k, H, dtype=torch.float32)
    codes = run_ranges(kernels["experts_rows"], kernels["experts_rows_jobs"],
                       (x.data_ptr(), indices.data_ptr(), N, k, gate_up.data_ptr(), down.data_ptr(), E, H, I), ranges,
                       (), [partials[j].data_ptr() for j in range(len(ranges))])
    if any(code != 0 for code in codes):
        raise MemoryError("glm5.kernels.experts: the kernel could not allocate its scratch memory")
    out = torch.empty(N, H, dtype=torch.float32)
    kernels["combine"](pointer_array(partials[j].data_ptr() for j in range(len(ranges))), len(ranges),
                       weights.data_ptr(), k, H, 0, N, out.data_ptr())
    return out


def experts_rows_reference(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                           down: torch.Tensor) -> torch.Tensor:
    """The same sums in PyTorch: each (row, expert) pair's weights gathered, one batched matmul."""
    N, k = indices.shape
    flat = indices.reshape(-1)
    rows = x.repeat_interleave(k, dim=0).unsqueeze(1)
    gate, up = torch.bmm(rows, gate_up.index_select(0, flat).transpose(1, 2)).chunk(2, dim=-1)
    ys = torch.bmm(F.silu(gate) * up, down.index_select(0, flat).transpose(1, 2)).squeeze(1)
    return (ys.float() * weights.reshape(-1, 1).float()).view(N, k, -1).sum(dim=1).to(x.dtype)
