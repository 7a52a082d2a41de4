"""Where a CUDA-graph decode step's time goes: torch.profiler over decode steps of the tiny-bench engine.

    python3 dev/profile_decode.py --device cuda --batch 1 8 --dtype float32 [--out DIR]

Prints, per batch size: ms per step (wall), the GPU kernels by total time (the kernels inside graph replays
included), and the host-side ops. A developer's tool (dev/), not a benchmark: bench/generate.py is that.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from glm5 import GLM5Config, GLM5ForCausalLM
from glm5.engine import LLMEngine, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--preset", default="tiny-bench")
    parser.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    parser.add_argument("--ops", action="store_true", help="also profile the uncaptured static forward by aten op")
    parser.add_argument("--out", default=None, help="folder for the tables (default: print only)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GLM5ForCausalLM(GLM5Config.from_preset(args.preset)).eval().to(args.device, getattr(torch, args.dtype))
    for batch in args.batch:
        llm = LLMEngine(model, max_num_seqs=max(8, batch), max_num_batched_tokens=4096, kv_cache_tokens=8192,
                        cuda_graphs=True)  # (on a CPU: the static forward, uncaptured)
        gen = torch.Generator().manual_seed(batch)
        params = SamplingParams(temperature=0, max_tokens=64 + args.steps, ignore_eos=True)
        for _ in range(batch):
            llm.add_request(torch.randint(0, model.config.vocab_size, (128,), generator=gen).tolist(), params)
        for _ in range(40):  # prefill, then decode until every graph shape in use is captured
            llm.step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            for _ in range(args.steps):
                llm.step()
            wall = (time.perf_counter() - t) / args.steps
        sort = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
        if args.ops and llm.graphs is not None:
            # the same static forward run uncaptured, so each kernel is charged to the aten op (with shapes)
            decode = max((e for e in llm.graphs.entries.values() if e.shape[1] == 1), key=lambda e: e.shape)
            prefill = max(llm.graphs.entries.values(), key=lambda e: e.shape[1])
            for entry in (decode, prefill):
                with profile(activities=activities, record_shapes=True) as ops:
                    for _ in range(8):
                        entry.body()
                print(f"uncaptured static forward, shape {entry.shape}, 8 runs:")
                print(ops.key_averages(group_by_input_shape=True).table(
                    sort_by=sort, row_limit=25, max_name_column_width=28, max_shapes_column_width=70))
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        head = f"batch {batch} {args.dtype}: {wall * 1e3:.3f} ms per decode step (profiled), replays {llm.graphs and llm.graphs.num_replays}"
        print(head)
        print(table)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"profile_b{batch}_{args.dtype}.txt"), "w") as fh:
                fh.write(head + "\n" + table)


if __name__ == "__main__":
    main()
