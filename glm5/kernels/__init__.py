"""Hand-written fast paths, each behind a switch with a pure-PyTorch fallback that gives the same numbers.

    from glm5.kernels import indexer_topk, latent_attention, cpu_kernels_enabled, use_cpu_kernels
    with use_cpu_kernels(False):      # force the PyTorch path (tests compare the two)
        ...

CPU kernels are portable C (`*.c` beside this file), compiled on first use with the system's C compiler
into `$GLM5_CACHE/kernels/` (see `glm5.kernels.build`) and called through ctypes. No compiler, a failed
build, or `GLM5_CPU_KERNELS=0` in the environment: the PyTorch path runs instead. Importing this package
compiles nothing.
"""

from glm5.kernels.build import cpu_kernels_enabled, load_library, use_cpu_kernels
from glm5.kernels.elementwise import rms_norm, swiglu, swiglu_runs
from glm5.kernels.indexer import indexer_topk
from glm5.kernels.sparse_attention import latent_attention, latent_attention_runs

__all__ = ["cpu_kernels_enabled", "indexer_topk", "latent_attention", "latent_attention_runs", "load_library",
           "rms_norm", "swiglu", "swiglu_runs", "use_cpu_kernels"]
