"""What every benchmark does last: write its results as JSON (creating the folder) and say where, with the
machine they came from (CPU model, the CPU kernels' instruction-set path, GPU) in the JSON and on screen.

    from results_io import machine, write_results
    print(machine()["summary"])        # e.g. "CPU AMD EPYC (kernels: avx512; CPU has avx512, avx2), 2 threads"
"""

from __future__ import annotations

import json
import os


def machine() -> dict:
    """The CPU model, the ISA path glm5's CPU kernels run (and every path the CPU could run), torch's thread
    count and the GPU's name if one is visible; `summary` is one line of it for the screen."""
    import torch

    from glm5.kernels.build import available_isas, cpu_model, selected_isa

    isa, why = selected_isa()
    info = {"cpu_model": cpu_model(), "cpu_isa": isa, "cpu_isa_reason": why, "cpu_isas_available": available_isas(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    capable = ", ".join(i for i in info["cpu_isas_available"] if i != "portable") or "no AVX2/NEON"
    info["summary"] = (f"CPU {info['cpu_model']} (kernels: {isa}; CPU has {capable}), {info['torch_threads']} threads"
                       + (f"; GPU {info['gpu']}" if info["gpu"] else ""))
    return info


def write_results(path: str | os.PathLike, results: dict) -> str:
    """Write results (plus a "machine" entry, unless the caller gave one) as JSON; print the machine and path."""
    path = os.fspath(path)
    results = dict(results)
    results.setdefault("machine", machine())
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    print(f"[bench] {results['machine']['summary']}")
    print(f"[bench] wrote {path}")
    return path
