"""The CPU kernels' instruction-set paths against the PyTorch code they replace: tiny-bench forward passes.

    .venv/bin/python bench/cpu_paths.py                        # 2K and 8K, every path this CPU can run + PyTorch
    .venv/bin/python bench/cpu_paths.py --seqs 2048 --repeats 5 --paths avx2 pytorch

One process, one model (the `tiny-bench` preset, fp32, batch 1, random weights); per length, the paths are
alternated pass by pass (so machine load falls on all alike) and each reports its median forward time and the
median time in the top-k selection (the lightning indexer, timed around `select_topk`). A path is
an ISA forced with GLM5_CPU_ISA (avx512, avx2, neon, portable: the builds an AVX-512, AVX2-only, ARM or older
CPU runs), the startup check off so the kernel itself is timed, or `pytorch` (GLM5_CPU_KERNELS=0: the
fallbacks) or `auto` (the default: the CPU's best path, with the startup check choosing kernel or fallback).
The logits of every path are checked against the PyTorch path's: within 1e-3 at 95% of positions or more.
At 2K all agree to ~1e-6; at 8K ~2% of positions differ: a query whose 64th and 65th indexer scores agree to
fp32 rounding (measured: 2.5e-8 apart at 0.79) keeps a different one of the two, and the later tokens that
attend to it inherit the change (random weights; either set is a correct top-k).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from results_io import machine, write_results  # bench/ is on sys.path when a bench runs


def _set_path(path: str) -> None:
    from glm5.kernels.build import ENV_SWITCH, ISA_ENV
    from glm5.kernels.check import CHECK_ENV

    os.environ[ENV_SWITCH] = "0" if path == "pytorch" else "1"
    os.environ[CHECK_ENV] = "1" if path == "auto" else "0"
    if path in ("pytorch", "auto"):
        os.environ.pop(ISA_ENV, None)
    else:
        os.environ[ISA_ENV] = path


def main() -> int:
    from glm5.kernels.build import available_isas

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192], help="sequence lengths")
    p.add_argument("--paths", nargs="+", default=None,
                   help="ISA paths and/or pytorch, auto (default: every ISA this CPU can run, pytorch, auto)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per path and length (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (on a machine shared with other jobs, "
                        "with --threads 1 it counts only the work done, not the waits for a core)")
    p.add_argument("--out", default="bench/results/cpu_paths.json", help="where the JSON goes")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    paths = args.paths or [*available_isas(), "pytorch", "auto"]
    unknown = [x for x in paths if x not in (*available_isas(), "pytorch", "auto")]
    if unknown:
        p.error(f"paths {unknown} cannot run on this CPU (it runs {', '.join(available_isas())}, pytorch, auto)")
    print(machine()["summary"])

    import glm5.model.mla as mla
    from glm5 import GLM5Config, GLM5ForCausalLM

    select = mla.select_topk
    indexer_s = [0.0]
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    def timed_select(*a, **kw):
        t0 = clock()
        out = select(*a, **kw)
        indexer_s[0] += clock() - t0
        return out

    mla.select_topk = timed_select
    torch.manual_seed(0)
    cfg = GLM5Config.from_preset("tiny-bench")
    model = GLM5ForCausalLM(cfg).eval()
    rows = []
    for seq in args.seqs:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
        times = {path: [] for path in paths}
        indexer = {path: [] for path in paths}
        logits = {}
        with torch.inference_mode():
            for path in paths:  # warm-up: builds each library, and `auto` runs its startup check
                _set_path(path)
                logits[path] = model(ids).logits
            for _ in range(args.repeats):
                for path in paths:
                    _set_path(path)
                    indexer_s[0] = 0.0
                    t0 = clock()
                    model(ids)
                    times[path].append(clock() - t0)
                    indexer[path].append(indexer_s[0])
        reference = logits.get("pytorch")
        for path in paths:
            median = statistics.median(times[path])
            row = {"seq": seq, "path": path, "times_s": times[path], "median_s": median,
                   "indexer_median_s": statistics.median(indexer[path])}
            if reference is not None:
                # per position: the largest logit difference. fp32 rounding moves logits by ~1e-6, but a query
                # whose k-th and (k+1)-th indexer scores tie to rounding may keep the other key on one path,
                # moving its logits (and those of later tokens attending to it) by O(0.1)
                per_position = (logits[path] - reference).abs().amax(-1)[0]
                row["max_abs_diff_vs_pytorch"] = float(per_position.max())
                row["positions_differing_vs_pytorch"] = float((per_position > 1e-3).float().mean())
            rows.append(row)
        base = statistics.median(times["pytorch"]) if "pytorch" in times else None
        for row in rows[-len(paths):]:
            vs = f", {base / row['median_s']:.2f}x PyTorch" if base else ""
            same = "" if reference is None else (f", logits within 1e-3 of PyTorch's at "
                                                  f"{1 - row['positions_differing_vs_pytorch']:.2%} of positions")
            print(f"{seq:>6} {row['path']:>9}: forward {row['median_s'] * 1e3:8.1f} ms (top-k selection "
                  f"{row['indexer_median_s'] * 1e3:7.1f} ms){vs}{same}")
            if reference is not None and row["positions_differing_vs_pytorch"] > 0.05:
                print(f"  {row['path']}: logits differ from PyTorch's at more than 5% of positions", file=sys.stderr)
                return 1
    write_results(args.out, {"preset": "tiny-bench", "threads": args.threads, "repeats": args.repeats,
                             "clock": args.clock, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
