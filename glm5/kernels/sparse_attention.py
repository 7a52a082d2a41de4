"""Sparse MLA attention over gathered latent rows on a CPU (`sparse_attention.c`), for inference.

    out = latent_attention(q, kv, rows, scale, latent_dim)   # None: not CPU fp32, kernels off, no compiler

q [N, H, D] (W_UK folded in), kv [R, D] latent rows (latent | rope key), rows [N, K] which row of kv each of
a query's K selected keys is (-1 = none) -> [N, H, latent_dim]: per head, softmax(scale * q . kv_row) over
the query's rows, times the rows' first latent_dim values. Used by `glm5.model.dsa.sparse_latent_attention`
(rows = selected positions + batch offset) and the engine's sparse decode (rows = cache slots); their
PyTorch code is the fallback and the reference in tests/test_kernels.py. No autograd: callers use it only
when no gradient is wanted.
"""

from __future__ import annotations

import ctypes

import torch

from glm5.kernels.build import load_library, run_threads

MAX_SELECTED = 4096  # the kernel's per-query buffers; GLM-5 selects 2048
_function = None


def _kernel():
    global _function
    lib = load_library("sparse_attention")
    if lib is None:
        return None
    if _function is None:
        fn = lib.glm5_sparse_latent_attention
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, p, p, i64, i64, i64, i64, i64, ctypes.c_float, i64, i64, p]
        fn.restype = ctypes.c_int
        _function = fn
    return _function


def latent_attention(
    q: torch.Tensor, kv: torch.Tensor, rows: torch.Tensor, scale: float, latent_dim: int
) -> torch.Tensor | None:
    """See the module docstring. Runs on torch.get_num_threads() threads over contiguous query ranges."""
    if (q.device.type != "cpu" or q.dtype != torch.float32 or kv.dtype != torch.float32
            or rows.shape[-1] > MAX_SELECTED or q.shape[1] > 256):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
        return None
    fn = _kernel()
    if fn is None:
        return None
    N, H, D = q.shape
    K = rows.shape[-1]
    if kv.shape[-1] != D or not 0 < latent_dim <= D:
        raise ValueError(f"latent_attention: q is [*, {H}, {D}], kv rows are {kv.shape[-1]} wide, latent_dim {latent_dim}")
    q = q.contiguous()
    kv = kv.contiguous()
    rows = rows.to(torch.int64).contiguous()
    out = torch.empty(N, H, latent_dim, dtype=torch.float32)
    threads = max(1, min(torch.get_num_threads(), N))
    bounds = [N * t // threads for t in range(threads + 1)]
    jobs = [(q.data_ptr(), kv.data_ptr(), rows.data_ptr(), N, H, D, latent_dim, K, float(scale), bounds[t],
             bounds[t + 1], out.data_ptr()) for t in range(threads) if bounds[t] < bounds[t + 1]]
    if not jobs:
        return out
    if any(run_threads(fn, jobs)):
        return None
    return out
