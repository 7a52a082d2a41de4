"""What every benchmark does last: write its results as JSON (creating the folder) and say where, with the
machine they came from in the JSON and on screen: the CPU model, its ISA flags (oneDNN / MKL pick GEMM kernels
by them), the instruction-set path glm5's CPU kernels run, torch's threads and the GPU.

    from results_io import machine, describe_cpu, write_results
    print(describe_cpu())              # e.g. "CPU AMD EPYC (kernels: avx512; flags avx512f, avx2, fma), 2 threads"
    write_results("bench/results/x.json", {...})   # adds "machine" (merged into one the results carry)
"""

from __future__ import annotations

import json
import os
import platform

# Environment switches that cap the ISA below what the CPU reports (an AVX2 machine emulated on an AVX-512 one:
# glm5's kernels, PyTorch's own vectorized ops, oneDNN's and MKL's GEMMs)
ISA_CAPS = ("GLM5_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")

# The flags that decide which code runs: oneDNN / MKL pick GEMM kernels by them, and glm5's C kernels are
# compiled per ISA (AVX-512 vs AVX2 + FMA vs NEON), so figures only compare on the same set.
ISA_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx2", "fma", "neon", "asimd", "sve", "bf16")


def _cpu_flags() -> list[str]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):  # x86 "flags", ARM "Features"
                    flags.update(value.split())
    except OSError:  # not Linux: no flags read
        pass
    return [f for f in ISA_FLAGS if f in flags]


def machine() -> dict:
    """The CPU model and ISA flags, the ISA path glm5's CPU kernels run (and every path the CPU could run),
    torch's thread count and the GPU's name if one is visible; `summary` is one line of it for the screen."""
    import torch

    from glm5.kernels.build import available_isas, cpu_model, selected_isa

    isa, why = selected_isa()
    info = {"cpu_model": cpu_model(), "cpu_flags": _cpu_flags(), "cpu_isa": isa, "cpu_isa_reason": why,
            "cpu_isas_available": available_isas(), "arch": platform.machine(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "isa_caps": {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)},
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    caps = ", ".join(f"{k}={v}" for k, v in info["isa_caps"].items())
    info["summary"] = (f"CPU {info['cpu_model']} (kernels: {isa}; flags {', '.join(info['cpu_flags']) or 'none read'}"
                       f"{'; capped: ' + caps if caps else ''}), {info['torch_threads']} threads"
                       + (f"; GPU {info['gpu']}" if info["gpu"] else ""))
    return info


def describe_cpu() -> str:
    return machine()["summary"]


def write_results(path: str | os.PathLike, results: dict) -> str:
    """Write results plus a "machine" entry (merged under one the caller gave) as JSON, atomically; print the
    machine and the path."""
    path = os.fspath(path)
    results = dict(results)
    given = results.get("machine") or {}
    # a caller's own description that is not a mapping (a processor string) is kept beside the measured one
    results["machine"] = {**machine(), **(given if isinstance(given, dict) else {"reported": given})}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    print(f"[bench] {results['machine']['summary']}")
    print(f"[bench] wrote {path}")
    return path
