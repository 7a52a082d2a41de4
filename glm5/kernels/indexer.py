"""The DSA indexer's scores fused with its top-k on a CPU (`indexer_topk.c`), for `glm5.model.dsa`.

    idx = indexer_topk(q, w, k, q_positions, topk)   # None: not a CPU tensor, kernels off, or no compiler

Same contract as `glm5.model.indexer.select_topk_blockwise`, whose PyTorch code is the fallback: the positions
of each query's `topk` highest-scoring visible keys, unsorted, -1 in the slots left when fewer are visible.
Scores are fp32 sums in another order than torch's matmul, so two keys whose scores agree to rounding
(~1e-6 relative) may swap in or out of the set, as between any two top-k implementations.
"""

from __future__ import annotations

import ctypes
import math

import torch

from glm5.kernels.build import bound_functions, has_openmp, load_library, run_threads

KEY_TILE = 64  # keys per tile in the kernel: the transposed key matrix is zero-padded to a multiple of it


def _bind(lib: ctypes.CDLL):
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn = lib.glm5_indexer_topk
    fn.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i64, p]
    fn.restype = ctypes.c_int
    jobs = None
    if has_openmp(lib):
        jobs = lib.glm5_indexer_topk_jobs
        jobs.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, p]
        jobs.restype = ctypes.c_int
    return fn, jobs


def _kernel():
    """(the per-range function, the OpenMP jobs function or None), or None when the library cannot be built."""
    lib = load_library("indexer_topk")
    return None if lib is None else bound_functions(lib, _bind)


@torch.no_grad()
def indexer_topk(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor, topk: int,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """q [B, S, H, D], w [B, S, H] head weights with every scale folded in, k [B, T, D], q_positions [B or 1,
    S], key_mask [B, T] (nonzero = may be attended) or None -> [B, S, topk] int64, or None when the kernel
    cannot run here. Threads: torch.get_num_threads(), over interleaved blocks of queries: torch's OpenMP
    workers when the library has OpenMP, else a thread pool (ctypes releases the GIL for the call)."""
    if q.device.type != "cpu" or topk < 1:
        return None
    kernel = _kernel()
    if kernel is None:
        return None
    fn, jobs_fn = kernel
    B, S, H, D = q.shape
    T = k.shape[1]
    padded = math.ceil(max(T, 1) / KEY_TILE) * KEY_TILE
    q = q.float().contiguous()
    w = w.float().contiguous()
    # keys in tiles of KEY_TILE, each tile transposed to [D, KEY_TILE] and contiguous (see the kernel)
    k_t = torch.zeros(B, padded, D, dtype=torch.float32)
    k_t[:, :T] = k
    k_t = k_t.view(B, padded // KEY_TILE, KEY_TILE, D).transpose(2, 3).contiguous()
    positions = q_positions.to(torch.int64).expand(B, S).contiguous()
    mask = key_mask.to(torch.uint8).contiguous() if key_mask is not None else None
    out = torch.empty(B, S, topk, dtype=torch.int64)
    threads = max(1, torch.get_num_threads())
    codes, jobs = [], []  # interleaved blocks of queries per thread: causal rows grow with position
    for b in range(B):
        args = (q[b].data_ptr(), w[b].data_ptr(), k_t[b].data_ptr(), positions[b].data_ptr(),
                None if mask is None else mask[b].data_ptr(), S, H, D, T, padded, topk)
        if jobs_fn is not None:
            codes.append(jobs_fn(*args, threads, out[b].data_ptr()))
        else:
            jobs += [args + (t, threads, out[b].data_ptr()) for t in range(threads)]
    if any(codes) or (jobs and any(run_threads(fn, jobs))):
        raise MemoryError("glm5.kernels.indexer_topk: out of memory for its score rows")
    return out
