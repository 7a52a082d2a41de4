"""What every benchmark does last: write its results as JSON (creating the folder) and say where, with the CPU
the figures were measured on (model, ISA flags, threads) beside them, printed and stored.

    from results_io import cpu_info, write_results
    print(cpu_info())                                   # {"model": "AMD EPYC ...", "isa": ["avx2", ...], ...}
    write_results("bench/results/x.json", {...})        # adds "cpu" unless the results carry their own
"""

from __future__ import annotations

import json
import os
import platform

# The flags that decide which code runs: oneDNN / MKL pick GEMM kernels by them, and glm5's C kernels are
# compiled for the native ISA (AVX-512 vs AVX2 + FMA vs NEON), so figures only compare on the same set.
ISA_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx2", "fma", "neon", "asimd", "sve", "bf16")


def cpu_info() -> dict:
    """The CPU's model name, the ISA flags of ISA_FLAGS it has, its logical CPUs and torch's threads."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and value.strip():
                    model = value.strip()
                elif key in ("flags", "features"):  # x86 "flags", ARM "Features"
                    flags.update(value.split())
    except OSError:  # not Linux: the model name from platform, no flags
        pass
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags], "machine": platform.machine(),
            "logical_cpus": os.cpu_count(), "torch_threads": threads}


def describe_cpu(info: dict | None = None) -> str:
    info = info or cpu_info()
    return f"{info['model']} ({', '.join(info['isa']) or 'no listed ISA flags'}; {info['torch_threads']} torch threads)"


def write_results(path: str | os.PathLike, results: dict) -> str:
    path = os.fspath(path)
    results = {**results, "cpu": results.get("cpu") or cpu_info()}
    print(f"[bench] cpu: {describe_cpu(results['cpu'])}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    print(f"[bench] wrote {path}")
    return path
