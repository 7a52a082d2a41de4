"""MTP speculative decoding: speed-up and accept length against plain greedy decoding, same engine, same model.

    .venv/bin/python bench/speculative.py --model runs/demo/model      # a model trained by `make demo`
    .venv/bin/python bench/speculative.py                              # newest runs/*/model, else random nano
    .venv/bin/python bench/speculative.py --compile --batch 1          # compiled CPU steps on both sides
    python bench/speculative.py --device cuda --model runs/demo/model  # on a GPU: cycles captured in CUDA graphs

Greedy outputs with and without speculation are checked to be identical. Accept length = tokens produced
per verifying step (1 + accepted drafts); 1.0 means no draft was ever right (expected on random weights).
Prompts are chat prompts (with the checkpoint's tokenizer) so a trained model sees text like its training data.
Each side is one engine, run once untimed (with --compile that compiles every step shape the prompts reach:
minutes with max-autotune) and then --reps times, the sides taking turns, with the prefix cache emptied.
Writes bench/results/speculative.json (speculative-compiled.json with --compile).
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time

import torch
from results_io import write_results  # bench/ is on sys.path when a bench runs

from glm5.engine.config import EngineConfig

MESSAGES = [
    [{"role": "user", "content": "What is the weather in Paris?"}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
    [{"role": "user", "content": "Explain what a list comprehension is."}],
    [{"role": "user", "content": "How do I open a file in Python?"}],
]


def newest_model_dir() -> str | None:
    found = sorted(glob.glob("runs/*/model/config.json"), key=os.path.getmtime)
    return os.path.dirname(found[-1]) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: newest runs/*/model)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3], help="draft tokens per step")
    parser.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="prompts decoded together")
    parser.add_argument("--reps", type=int, default=5, help="repetitions, the sides alternating (medians)")
    EngineConfig.add_arguments(parser, kv_cache_tokens=8192, threads=2)  # the engine's flags; k is set per row
    parser.add_argument("--out", default=None, help="results JSON (default: bench/results/speculative.json, "
                        "speculative-compiled.json with --compile)")
    args = parser.parse_args()
    name = "speculative-compiled.json" if args.compile else "speculative.json"
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", name)
    engine_config = EngineConfig.from_args(args)
    torch.set_num_threads(args.threads)

    from glm5 import GLM5Config, GLM5ForCausalLM
    from glm5.chat import render_messages
    from glm5.engine import LLMEngine, SamplingParams
    from glm5.tokenizer import Tokenizer, default_tokenizer

    directory = args.model or newest_model_dir()
    if directory:
        model = GLM5ForCausalLM.from_pretrained(directory).eval()
        has_tok = os.path.exists(os.path.join(directory, "tokenizer.json"))
        tokenizer = Tokenizer.from_pretrained(directory) if has_tok else default_tokenizer()
        source = directory
    else:
        torch.manual_seed(0)
        model = GLM5ForCausalLM(GLM5Config.from_preset("nano")).eval()
        tokenizer = default_tokenizer()
        source = "random nano (no trained model found: accept length will be ~1)"
    # the engine runs where the model's weights are: --device / --dtype place them (default: the CPU, as saved)
    model = model.to(device=engine_config.device or "cpu", dtype=engine_config.torch_dtype())
    print(f"model: {source} on {engine_config.device or 'cpu'}")
    if not len(model.mtp):
        print("this checkpoint has no MTP layer: nothing to measure")
        return 1
    prompts_all = [tokenizer.encode(render_messages(m, enable_thinking=False), allow_special=True) for m in MESSAGES]
    params = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
    results = {"model": source, "device": engine_config.device or "cpu", "dtype": str(next(model.parameters()).dtype),
               "new_tokens": args.new, "threads": args.threads, "compiled": args.compile,
               "compile_mode": args.compile_mode if args.compile else None, "rows": []}
    engines = {k: LLMEngine(model, engine_config.replace(num_speculative_tokens=k)) for k in [0, *args.k]}

    def run(k: int, prompts):
        engine = engines[k]
        engine.block_manager.reset_prefix_cache()  # each run prefills its prompts again
        engine.stats = type(engine.stats)()
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        return time.perf_counter() - start, [o.token_ids for o in outs]

    for batch in args.batch:
        prompts = [prompts_all[i % len(prompts_all)] for i in range(batch)]
        first = {}
        for k in engines:  # untimed: first steps, and every compile these prompts need
            first[k] = run(k, prompts)[0]
        # the sides alternate within each repetition, so a machine that slows down slows both (this one is
        # shared: a side timed minutes after the other can be 30% off); speed-up = median of same-repetition ratios
        times = {k: [] for k in engines}
        outs = {}
        for _ in range(args.reps):
            for k in engines:
                elapsed, outs[k] = run(k, prompts)
                times[k].append(elapsed)
        base_time = statistics.median(times[0])
        print(f"batch {batch}: plain greedy {batch * args.new / base_time:7.1f} tok/s (first run {first[0]:.0f} s)",
              flush=True)
        for k in args.k:
            engine = engines[k]
            spec_time = statistics.median(times[k])
            row = {"batch": batch, "k": k, "tok_s": batch * args.new / spec_time, "first_run_s": first[k],
                   "baseline_tok_s": batch * args.new / base_time,
                   "speedup": statistics.median(b / t for b, t in zip(times[0], times[k])),
                   "mean_accept_length": engine.stats.mean_accept_length,
                   "draft_acceptance": engine.stats.accepted / max(1, engine.stats.drafted),
                   "identical_to_greedy": outs[k] == outs[0]}
            results["rows"].append(row)
            print(f"  k={k}: {row['tok_s']:7.1f} tok/s  speed-up {row['speedup']:.2f}x  accept length "
                  f"{row['mean_accept_length']:.2f}  drafts accepted {row['draft_acceptance']:.0%}  "
                  f"identical {row['identical_to_greedy']}", flush=True)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
