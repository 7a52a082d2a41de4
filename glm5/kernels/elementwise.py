"""RMSNorm and SwiGLU on a CPU in fp32 (`elementwise.c`), forward and backward, for glm5.model.layers/moe.

    y = rms_norm(x, weight, eps)   # None: not CPU fp32, kernels off, or no compiler (PyTorch runs instead)
    a = swiglu(h)                  # h [..., 2I] = gate | up -> silu(gate) * up, [..., I]

Same math as the PyTorch code they replace (fp32 RMSNorm with the weight applied after normalizing, as
transformers'; SiLU(g) * u), to rounding: sums in another order, a vector exp accurate to ~1 ulp.
"""

from __future__ import annotations

import ctypes
import math

import torch

from glm5.kernels.build import bind, bound_functions, grad_wanted, load_library, run_ranges, split_range

MIN_ELEMENTS_PER_THREAD = 1 << 15  # below this a thread's start costs more than its share of the work


def _bind(lib: ctypes.CDLL) -> dict:
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {  # argtypes, and where the (begin, end) row range sits in them
        "rmsnorm_forward": ([p, p, f32, i64, i64, i64, p, p], 4),
        "rmsnorm_backward": ([p, p, p, p, i64, i64, i64, p, p], 5),
        "swiglu_forward": ([p, i64, i64, i64, i64, p], 3),
        "swiglu_backward": ([p, i64, p, i64, i64, i64, p], 4),
        "moe_combine": ([p, p, p, i64, i64, i64, i64, p], 5),
        "moe_combine_backward": ([p, p, p, p, i64, i64, i64, p, p], 5),
    }
    functions = {}
    for name, (argtypes, range_at) in signatures.items():
        # the OpenMP twin takes (bounds, jobs) for the row range: it runs on torch's OpenMP threads
        functions[name], functions[name + "_jobs"] = bind(lib, name, argtypes, None, range_at)
    return functions


def _kernels():
    lib = load_library("elementwise")
    return None if lib is None else bound_functions(lib, _bind)


def _run(name: str, head: tuple, ranges: list[tuple[int, int]], tail: tuple, per_job: list | None = None) -> None:
    """Kernel `name` over row ranges (see `build.run_ranges`)."""
    kernels = _kernels()
    run_ranges(kernels[name], kernels[name + "_jobs"], head, ranges, tail, per_job)


def _row_ranges(rows: int, width: int) -> list[tuple[int, int]]:
    return split_range(rows, max(1, min(torch.get_num_threads(), rows, math.ceil(rows * width / MIN_ELEMENTS_PER_THREAD))))


def _runs(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and _kernels() is not None


def _rms_forward(x2, weight, eps, keep_rstd):
    R, C = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(R, dtype=torch.float32) if keep_rstd else None
    _run("rmsnorm_forward", (x2.data_ptr(), weight.data_ptr(), eps, C), _row_ranges(R, C),
         (y.data_ptr(), None if rstd is None else rstd.data_ptr()))
    return y, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, eps):
        y, rstd = _rms_forward(x2, weight, eps, keep_rstd=True)
        ctx.save_for_backward(x2, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        R, C = x2.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x2)
        ranges = _row_ranges(R, C)
        partials = torch.zeros(len(ranges), C, dtype=torch.float32)
        _run("rmsnorm_backward", (x2.data_ptr(), weight.data_ptr(), rstd.data_ptr(), dy.data_ptr(), C), ranges,
             (dx.data_ptr(),), per_job=[row.data_ptr() for row in partials])
        return dx, (partials.sum(0) if ctx.needs_input_grad[1] else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * x / sqrt(mean(x^2, -1) + eps) over the last dim, fp32 CPU tensors; None when it cannot run."""
    if not _runs(x, weight) or x.shape[-1] != weight.shape[0] or x.numel() == 0:
        return None
    x2 = x.contiguous().view(-1, x.shape[-1])
    weight = weight.contiguous()
    if grad_wanted(x, weight):
        return _RMSNorm.apply(x2, weight, float(eps)).view(x.shape)
    return _rms_forward(x2, weight, float(eps), keep_rstd=False)[0].view(x.shape)


def _swiglu_forward(h2, out=None):
    R, two_i = h2.shape
    I = two_i // 2
    out = torch.empty(R, I, dtype=torch.float32) if out is None else out
    if R:
        _run("swiglu_forward", (h2.data_ptr(), two_i, I), _row_ranges(R, two_i), (out.data_ptr(),))
    return out


def _swiglu_backward(h2, dout, out=None):
    R, two_i = h2.shape
    dh = torch.empty_like(h2) if out is None else out
    dout = dout.contiguous()  # a named reference: a temporary copy would be freed before the kernel reads it
    if R:
        _run("swiglu_backward", (h2.data_ptr(), two_i, dout.data_ptr(), two_i // 2),
             _row_ranges(R, two_i), (dh.data_ptr(),))
    return dh


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h2):
        ctx.save_for_backward(h2)
        return _swiglu_forward(h2)

    @staticmethod
    def backward(ctx, dout):
        (h2,) = ctx.saved_tensors
        return _swiglu_backward(h2, dout)


def swiglu_runs(*tensors: torch.Tensor) -> bool:
    """Whether `swiglu` runs on tensors like these (CPU fp32, kernels on and built)."""
    return _runs(*tensors)


def swiglu(h: torch.Tensor) -> torch.Tensor | None:
    """h [..., 2I] (gate | up) -> silu(gate) * up [..., I], fp32 CPU; None when it cannot run. The backward
    gives one [..., 2I] gradient (no cat of two halves)."""
    if not _runs(h) or h.shape[-1] % 2 or h.numel() == 0:
        return None
    h2 = h.contiguous().view(-1, h.shape[-1])
    out = _SwiGLU.apply(h2) if grad_wanted(h) else _swiglu_forward(h2)
    return out.view(*h.shape[:-1], h.shape[-1] // 2)


def moe_combine(ys: torch.Tensor, weights: torch.Tensor | None, inverse: torch.Tensor, tokens: int) -> torch.Tensor:
    """out [tokens, H]: out[n] = sum_j weights[inverse[n, j]] * ys[inverse[n, j]] (no autograd; the caller's
    Function differentiates). ys [R, H] fp32, weights [R] or None, inverse [tokens, k] int64."""
    R, H = ys.shape
    k = inverse.shape[1]
    out = torch.empty(tokens, H, dtype=torch.float32)
    if tokens:
        _run("moe_combine", (ys.data_ptr(), None if weights is None else weights.data_ptr(), inverse.data_ptr(), k, H),
             _row_ranges(tokens, H * k), (out.data_ptr(),))
    return out


def moe_combine_backward(dout: torch.Tensor, ys: torch.Tensor, weights: torch.Tensor, token_of: torch.Tensor):
    """-> dys [R, H] = weights * dout[token_of], dweights [R] = rowwise dout[token_of] . ys"""
    R, H = ys.shape
    dout = dout.contiguous()
    dys = torch.empty_like(ys)
    dw = torch.empty(R, dtype=torch.float32)
    if R:
        _run("moe_combine_backward", (dout.data_ptr(), ys.data_ptr(), weights.data_ptr(), token_of.data_ptr(), H),
             _row_ranges(R, H), (dys.data_ptr(), dw.data_ptr()))
    return dys, dw


def swiglu_into(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h [R, 2I] (contiguous rows) written into out [R, I]; no autograd."""
    return _swiglu_forward(h, out)


def swiglu_backward_into(h: torch.Tensor, dout: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of swiglu at h [R, 2I] for dout [R, I] -> [R, 2I]; no autograd."""
    return _swiglu_backward(h, dout, out)
