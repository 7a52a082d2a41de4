"""Small-M fp32 GEMMs on a GPU: the decode engine's linears at batch 1-32, by cuBLAS's own choice and by two
alternatives (the transposed product; cuBLASLt). Found while profiling decode at batch 8 on an H200, where fp32
F.linear([8, 256] x [256, 256]) took ~29 us per call (dev/LOG.md).

    python3 dev/gemm_small_m.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def timed(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3  # us


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    for dtype in (torch.float32, torch.bfloat16):
        for k, n in ((256, 256), (256, 768), (768, 256), (256, 4096)):
            w = torch.randn(n, k, device="cuda", dtype=dtype)
            for m in (1, 8, 32):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                torch.backends.cuda.preferred_blas_library("cublas")
                a = timed(lambda x=x, w=w: F.linear(x, w))
                b = timed(lambda x=x, w=w: torch.mm(w, x.t()).t())
                torch.backends.cuda.preferred_blas_library("cublaslt")
                c = timed(lambda x=x, w=w: F.linear(x, w))
                torch.backends.cuda.preferred_blas_library("cublas")
                print(f"{str(dtype):15s} [{m:3d}, {k}] x [{k}, {n}]: linear {a:6.1f} us   W @ x.T {b:6.1f} us   "
                      f"cublaslt {c:6.1f} us")


if __name__ == "__main__":
    main()
