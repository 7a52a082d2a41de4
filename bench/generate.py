"""Decode speed and time to first token: the glm5 engine against transformers' `generate`, same weights.

    .venv/bin/python bench/generate.py                      # tiny-bench config, prompt 128 + 128 new, batch 1 and 8
    .venv/bin/python bench/generate.py --batch 1 --new 64 --reps 5
    python bench/generate.py --device cuda                  # on a GPU: glm5 with CUDA graphs and glm5 eager

Both run greedy in fp32 (or --dtype) on the same GlmMoeDsaForCausalLM / GLM5ForCausalLM weights (transformers
with sdpa attention and its default DynamicCache). Runs alternate (transformers, glm5, transformers, ...) so a
busy machine slows both alike; medians are reported. Every repetition feeds fresh random prompts (the same to
both), so the engine, built once per batch size, never reuses a cached prefix. On CUDA the engine's decode
graphs (the prefill's shape and every decode shape) are captured before timing (reported as graph_capture_s), and the engine also
runs with cuda_graphs=False as "glm5_eager". Metrics, per batch size:
  ttft_s          time to the first new token (the prefill), median
  decode_tok_s    new tokens after the first / time after the first
  e2e_tok_s       all new tokens / total time (new tokens/s end to end)
Writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from results_io import write_results  # bench/ is on sys.path when a bench runs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_transformers(twin, prompts: torch.Tensor, new: int) -> tuple[float, float]:
    kwargs = dict(do_sample=False, pad_token_id=0)
    _sync(prompts.device)
    t = time.perf_counter()
    twin.generate(prompts, max_new_tokens=1, min_new_tokens=1, **kwargs)
    _sync(prompts.device)
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    out = twin.generate(prompts, max_new_tokens=new, min_new_tokens=new, **kwargs)
    _sync(prompts.device)
    total = time.perf_counter() - t
    assert out.shape[1] == prompts.shape[1] + new
    return ttft, total


def run_glm5(engine, prompts: list[list[int]], new: int) -> tuple[float, float]:
    """(every step ends in the sampler's copy of the tokens to the host: the clock sees finished work)"""
    from glm5.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    t = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    first = None
    produced = 0
    while engine.has_unfinished():
        for out in engine.step():
            produced += len(out.new_token_ids)
        if first is None and produced >= len(prompts):
            first = time.perf_counter() - t
    total = time.perf_counter() - t
    assert produced == new * len(prompts)
    return first, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-bench", help="model config preset (random weights)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu / cuda (both models on it)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype of both")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "generate.json"))
    args = parser.parse_args()
    from conftest import transformers_twin  # (sets 2 threads on import: set ours after it)

    torch.set_num_threads(args.threads)

    from glm5 import GLM5Config, GLM5ForCausalLM
    from glm5.engine import LLMEngine

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = GLM5Config.from_preset(args.preset)
    model = GLM5ForCausalLM(cfg).eval()
    twin = transformers_twin(model, "sdpa").to(device=device, dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    results = {"config": args.preset, "prompt_tokens": args.prompt, "new_tokens": args.new, "threads": args.threads,
               "device": str(device), "dtype": args.dtype, "torch": torch.__version__, "machine": machine, "runs": {}}
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)

        def make_engine(batch=batch, **kwargs):
            return LLMEngine(model, max_num_seqs=max(8, batch), max_num_batched_tokens=max(512, batch * args.prompt),
                             kv_cache_tokens=(args.reps + 2) * batch * (args.prompt + args.new) + 256, **kwargs)

        engines = {"glm5": make_engine()}
        if device.type == "cuda":
            engines["glm5_eager"] = make_engine(cuda_graphs=False)
        capture_s = None
        if engines["glm5"].graphs is not None:
            t = time.perf_counter()
            engines["glm5"].graphs.capture(batch, args.prompt, args.prompt)  # the prefill step's shape
            n_graphs = engines["glm5"].graphs.capture_decode(args.prompt + args.new, [batch])
            capture_s = time.perf_counter() - t
            print(f"  captured {n_graphs} CUDA graphs (prefill and decode) in {capture_s:.2f} s", flush=True)
        warm = torch.randint(0, cfg.vocab_size, (batch, 8), generator=gen)
        run_transformers(twin, warm.to(device), 2)  # warm-up all
        for engine in engines.values():
            run_glm5(engine, warm.tolist(), 2)
        times: dict[str, list] = {"transformers": [], **{name: [] for name in engines}}
        for _ in range(args.reps):
            prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt), generator=gen)  # fresh: no prefix hits
            times["transformers"].append(run_transformers(twin, prompts.to(device), args.new))
            for name, engine in engines.items():
                times[name].append(run_glm5(engine, prompts.tolist(), args.new))

        def summary(runs, batch=batch):
            ttft = statistics.median(r[0] for r in runs)
            total = statistics.median(r[1] for r in runs)
            decode = statistics.median(batch * (args.new - 1) / max(r[1] - r[0], 1e-9) for r in runs)
            return {"ttft_s": ttft, "decode_tok_s": decode, "e2e_tok_s": batch * args.new / total, "total_s": total}

        print("  runs (ttft, total):", {name: [tuple(round(x, 4) for x in r) for r in runs] for name, runs in times.items()})
        row = {name: summary(runs) for name, runs in times.items()}
        if capture_s is not None:
            graphs = engines["glm5"].graphs
            row["graph_capture_s"] = capture_s
            row["graph_replays"] = graphs.num_replays
            row["graph_failure"] = graphs.failed
            print(f"  glm5: {graphs.num_replays} steps replayed from {len(graphs.entries)} CUDA graphs"
                  + (f"; capture FAILED: {graphs.failed}" if graphs.failed else ""), flush=True)
        if "glm5_eager" in row:
            row["speedup_decode_eager"] = row["glm5_eager"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
        row["speedup_decode"] = row["glm5"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
        row["speedup_e2e"] = row["glm5"]["e2e_tok_s"] / row["transformers"]["e2e_tok_s"]
        row["ttft_ratio"] = row["transformers"]["ttft_s"] / row["glm5"]["ttft_s"]
        results["runs"][f"batch{batch}"] = row
        print(f"batch {batch}: decode tok/s  transformers {row['transformers']['decode_tok_s']:8.1f}  "
              f"glm5 {row['glm5']['decode_tok_s']:8.1f}  ({row['speedup_decode']:.2f}x)   "
              f"e2e {row['transformers']['e2e_tok_s']:.1f} vs {row['glm5']['e2e_tok_s']:.1f} ({row['speedup_e2e']:.2f}x)   "
              f"TTFT {row['transformers']['ttft_s'] * 1e3:.1f} ms vs {row['glm5']['ttft_s'] * 1e3:.1f} ms "
              f"({row['ttft_ratio']:.2f}x)", flush=True)
        if "glm5_eager" in row:
            print(f"         glm5 without CUDA graphs: decode tok/s {row['glm5_eager']['decode_tok_s']:8.1f} "
                  f"({row['speedup_decode_eager']:.2f}x)  TTFT {row['glm5_eager']['ttft_s'] * 1e3:.1f} ms", flush=True)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
