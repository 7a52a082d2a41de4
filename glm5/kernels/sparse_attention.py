"""Sparse MLA attention over gathered latent rows on a CPU (`sparse_attention.c`), for inference.

    out = latent_attention(q, kv, rows, scale, latent_dim)   # None: not CPU fp32, kernels off, no compiler

q [N, H, D] (W_UK folded in), kv [R, D] latent rows (latent | rope key), rows [N, K] which row of kv each of
a query's K selected keys is (-1 = none) -> [N, H, latent_dim]: per head, softmax(scale * q . kv_row) over
the query's rows, times the rows' first latent_dim values. Used by `glm5.model.dsa.sparse_latent_attention`
(rows = selected positions + batch offset) and the engine's sparse decode (rows = cache slots); their
PyTorch code is the fallback and the reference in tests/test_kernels.py. Differentiable: the backward is a
second C kernel (training's sparse DSA stage).
"""

from __future__ import annotations

import ctypes

import torch

from glm5.kernels.build import bind, bound_functions, grad_wanted, load_library, run_ranges, split_range

MAX_SELECTED = 4096  # the kernel's per-query buffers; GLM-5 selects 2048


def _bind(lib: ctypes.CDLL) -> dict:
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    forward = [p, p, p, i64, i64, i64, i64, i64, f32, i64, i64, p, p]
    backward = [p, p, p, p, p, p, i64, i64, i64, i64, i64, f32, i64, i64, p, p]
    functions = {}
    functions["forward"], functions["forward_jobs"] = bind(lib, "sparse_latent_attention", forward, ctypes.c_int, 9)
    functions["backward"], functions["backward_jobs"] = bind(lib, "sparse_latent_attention_backward", backward,
                                                             ctypes.c_int, 12)
    return functions


def _kernel(name: str = "forward"):
    lib = load_library("sparse_attention")
    return None if lib is None else bound_functions(lib, _bind)[name]


def _forward(q, kv, rows, scale, latent_dim, keep_probs: bool = False):
    """-> out [N, H, latent_dim], and (keep_probs) the probabilities [N, H, K] the backward reads."""
    N, H, D = q.shape
    out = torch.empty(N, H, latent_dim, dtype=torch.float32)
    probs = torch.empty(N, H, rows.shape[1], dtype=torch.float32) if keep_probs else None
    head = (q.data_ptr(), kv.data_ptr(), rows.data_ptr(), N, H, D, latent_dim, rows.shape[1], float(scale))
    tail = (out.data_ptr(), None if probs is None else probs.data_ptr())
    if any(run_ranges(_kernel(), _kernel("forward_jobs"), head, split_range(N, max(1, torch.get_num_threads())), tail)):
        raise MemoryError("glm5.kernels.latent_attention: out of memory")
    return out, probs


class _LatentAttention(torch.autograd.Function):
    """Forward and backward both in C; the forward keeps its probabilities ([N, H, K]) for the backward."""

    @staticmethod
    def forward(ctx, q, kv, rows, scale, latent_dim, sequences):
        out, probs = _forward(q, kv, rows, scale, latent_dim, keep_probs=True)
        ctx.save_for_backward(q, kv, rows, out, probs)
        ctx.scale, ctx.sequences = scale, sequences
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, rows, out, probs = ctx.saved_tensors
        N, H, D = q.shape
        L = dout.shape[-1]
        dout = dout.float().contiguous()
        dq = torch.empty_like(q)
        threads = max(1, min(torch.get_num_threads(), N))
        # queries of one sequence only read that sequence's rows: whole sequences per thread write disjoint
        # rows of dkv; with fewer sequences than threads, each thread adds into its own copy
        if ctx.sequences >= threads:
            per = N // ctx.sequences
            parts = [(a * per, b * per) for a, b in split_range(ctx.sequences, threads)]
            buffers = [torch.zeros_like(kv)] * len(parts)  # one shared dkv, disjoint rows per thread
        else:
            parts = split_range(N, threads)
            buffers = [torch.zeros_like(kv) for _ in parts]
        head = (q.data_ptr(), kv.data_ptr(), rows.data_ptr(), out.data_ptr(), probs.data_ptr(), dout.data_ptr(), N, H,
                D, L, rows.shape[1], float(ctx.scale))
        if any(run_ranges(_kernel("backward"), _kernel("backward_jobs"), head, parts, (dq.data_ptr(),),
                          per_job=[buf.data_ptr() for buf in buffers])):
            raise MemoryError("glm5.kernels.latent_attention: out of memory in the backward")
        dkv = buffers[0]
        for extra in buffers[1:]:
            if extra is not dkv:
                dkv += extra
        return dq, dkv, None, None, None, None


def latent_attention_runs(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether `latent_attention` would run for these inputs (CPU, fp32, kernels on and built)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and kv.dtype == torch.float32
            and q.shape[-2] <= 256 and _kernel() is not None)


def latent_attention(
    q: torch.Tensor, kv: torch.Tensor, rows: torch.Tensor, scale: float, latent_dim: int, sequences: int = 1
) -> torch.Tensor | None:
    """See the module docstring. Runs on torch.get_num_threads() threads over contiguous query ranges.

    With autograd (q or kv requiring grad) the backward is C too. `sequences`: the queries form this many
    equal contiguous groups, each reading only its own rows (a batch: rows = position + b * T), so the
    backward's threads can own whole groups' rows; 1 is always safe."""
    if rows.shape[-1] > MAX_SELECTED or not latent_attention_runs(q, kv):
        return None
    N, H, D = q.shape
    if kv.shape[-1] != D or not 0 < latent_dim <= D:
        raise ValueError(f"latent_attention: q is [*, {H}, {D}], kv rows are {kv.shape[-1]} wide, latent_dim {latent_dim}")
    if sequences < 1 or N % sequences:
        sequences = 1
    q, kv, rows = q.contiguous(), kv.contiguous(), rows.to(torch.int64).contiguous()
    if grad_wanted(q, kv):
        return _LatentAttention.apply(q, kv, rows, float(scale), latent_dim, sequences)
    return _forward(q, kv, rows, scale, latent_dim)[0]
