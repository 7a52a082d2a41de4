"""Prefill and decode speed: the glm5 engine against llama.cpp on the same model, threads and CPU.

    .venv/bin/python bench/llamacpp.py                          # tiny-bench (random weights), f32 and q8_0
    .venv/bin/python bench/llamacpp.py --model runs/latest/model --prompt 256 --new 64
    .venv/bin/python bench/llamacpp.py --types f32 --reps 5 --threads 2

The model goes to llama.cpp as `glm5 export gguf` writes it (llama-cpp-python, f32 latent / indexer caches;
bench/llamacpp_peer.py, which bench/generate.py shares).
Per type, batch 1, greedy, runs alternate (llama.cpp, glm5, llama.cpp, ...) and medians are reported:
  prefill_tok_s   prompt tokens / time to the first new token
  decode_tok_s    new tokens after the first / time after the first
For q8_0, llama.cpp runs its q8_0 kernels; glm5 runs the same file's weights dequantized to fp32 (glm5 has no
q8_0 matmul), so the q8_0 row is llama.cpp's low-bit speed against glm5's fp32 speed on equal numbers.
Greedy tokens of the two are compared (f32: must be equal; q8_0: reported, llama.cpp also rounds activations).
Writes bench/results/llamacpp.json with the CPU model and ISA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from llamacpp_peer import (
    describe_mismatch,
    export_model,
    first_mismatch,
    import_llama_cpp,
    open_llama,
    run_llama,
    save_for_export,
)
from results_io import describe_cpu, write_results  # bench/ is on sys.path when a bench runs


def run_glm5(engine, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    from glm5.engine import SamplingParams

    t = time.perf_counter()
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    first, out = None, []
    while engine.has_unfinished():
        for step in engine.step():
            out.extend(step.new_token_ids)
        if first is None and out:
            first = time.perf_counter() - t
    return first, time.perf_counter() - t, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: tiny-bench, random weights)")
    parser.add_argument("--types", nargs="+", default=["f32", "q8_0"], choices=["f32", "f16", "q8_0", "q4_k"],
                        help="GGUF types to run")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both (torch and llama.cpp)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "llamacpp.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llama_cpp, why = import_llama_cpp()
    if llama_cpp is None:
        raise SystemExit(why)

    from glm5 import GLM5Config, GLM5ForCausalLM
    from glm5.engine import LLMEngine
    from glm5.quant.gguf import load_gguf_model
    from glm5.tokenizer import default_tokenizer

    work = Path(tempfile.mkdtemp(prefix="glm5-bench-llamacpp-"))
    if args.model is None:
        torch.manual_seed(0)
        model = GLM5ForCausalLM(GLM5Config.from_preset("tiny-bench", vocab_size=default_tokenizer().vocab_size))
        model_dir = save_for_export(model, work / "tiny-bench")
    else:
        model_dir = Path(args.model)
    cfg = GLM5Config.from_pretrained(model_dir)
    results = {"model": args.model or "tiny-bench (random weights)", "prompt_tokens": args.prompt, "new_tokens": args.new,
               "threads": args.threads, "llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
               "runs": {}}
    gen = torch.Generator().manual_seed(0)
    for out_type in args.types:
        path = export_model(model_dir, work, out_type)
        llm = open_llama(path, n_ctx=args.prompt + args.new + 8, n_batch=args.prompt, threads=args.threads)
        model = (GLM5ForCausalLM.from_pretrained(model_dir) if out_type == "f32" else load_gguf_model(path, model_dir))
        engine = LLMEngine(model.eval(), max_num_seqs=1, max_num_batched_tokens=max(512, args.prompt),
                           kv_cache_tokens=args.prompt + args.new + 256)
        warm = torch.randint(0, cfg.vocab_size - 64, (16,), generator=gen).tolist()
        run_llama(llm, warm, 4)
        run_glm5(engine, warm, 4)
        times: dict[str, list] = {"llama.cpp": [], "glm5": []}
        same, first = [], None
        for _ in range(args.reps):
            prompt = torch.randint(0, cfg.vocab_size - 64, (args.prompt,), generator=gen).tolist()
            theirs = run_llama(llm, prompt, args.new)
            ours = run_glm5(engine, prompt, args.new)
            times["llama.cpp"].append(theirs[:2])
            times["glm5"].append(ours[:2])
            same.append(theirs[2] == ours[2])
            if first is None and not same[-1]:  # untimed: where they part, and how near a tie it was on each side
                first = first_mismatch(model, llm, prompt, ours[2], theirs[2])

        def summary(runs):
            return {"prefill_tok_s": statistics.median(args.prompt / r[0] for r in runs),
                    "decode_tok_s": statistics.median((args.new - 1) / max(r[1] - r[0], 1e-9) for r in runs),
                    "ttft_s": statistics.median(r[0] for r in runs)}

        row = {name: summary(runs) for name, runs in times.items()}
        row["same_greedy_tokens"] = all(same)
        row["first_mismatch"] = first
        row["glm5_vs_llama_cpp_decode"] = row["glm5"]["decode_tok_s"] / row["llama.cpp"]["decode_tok_s"]
        row["glm5_vs_llama_cpp_prefill"] = row["glm5"]["prefill_tok_s"] / row["llama.cpp"]["prefill_tok_s"]
        row["gguf_mib"] = path.stat().st_size / 2**20
        llm.close()
        results["runs"][out_type] = row
        if out_type == "f32" and first is not None:
            print(f"  note: f32 {describe_mismatch(first)}; a near-tie at a top-k or router cut (dev/LOG.md, GGUF export)",
                  flush=True)
        print(f"{out_type:5s}: prefill tok/s llama.cpp {row['llama.cpp']['prefill_tok_s']:8.1f}  glm5 "
              f"{row['glm5']['prefill_tok_s']:8.1f} ({row['glm5_vs_llama_cpp_prefill']:.2f}x)   decode tok/s llama.cpp "
              f"{row['llama.cpp']['decode_tok_s']:7.1f}  glm5 {row['glm5']['decode_tok_s']:7.1f} "
              f"({row['glm5_vs_llama_cpp_decode']:.2f}x)   same tokens: {row['same_greedy_tokens']}", flush=True)
    print(f"CPU: {describe_cpu()}")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
