"""One table for a demo model in every weight format glm5 writes: size, held-out perplexity, tool calls, decode speed.

    .venv/bin/python bench/quant.py                                  # the newest runs/*/model (`make demo` writes one)
    .venv/bin/python bench/quant.py --model runs/demo/model --ternary-steps 100

Formats, each written to disk by glm5's own converters and read back with `load_any_checkpoint`:
    bf16              the model's weights rounded to bf16 (`save_pretrained` of the bf16 model)
    fp8               `glm5 quantize fp8` (block-wise e4m3, 128x128)
    int4 RTN          `glm5 quantize int4 --method rtn`  (asymmetric groups of 128)
    int4 GPTQ         `glm5 quantize int4 --method gptq` (calibrated on the demo corpus's training split)
    q2 mix            `glm5 quantize q2 --avg-bits 2.56 --method gptq`
    ternary (PTQ)     `glm5 quantize ternary` (absmean, post-training)
    ternary (trained) `glm5 train sft --init MODEL --ternary` for --ternary-steps steps on the demo's SFT
                      conversations (quantization-aware training from the model, BitNet b1.58 STE, on the data
                      the model last learned: the chat format and its tool calls)
    ternary (trained + RL)  `glm5 rl --init` that ternary model, the demo's RL stage (APRIL, the tool-call env,
                      kept KV caches) for --ternary-rl-steps steps: shadows through ternary views, glm5-ternary out
Per format: bytes of safetensors on disk, held-out perplexity on the demo's held-out stdlib text and chats
(the same split `glm5 demo` holds out, its seq len 512), tool-call validity / right tool / exact call on the
demo's held-out requests (glm5.train.evaluate.tool_call_eval, greedy), and decode tokens/s of the engine
(batch 1, greedy, median of --repeats; low-bit weights are dequantized per step, so this is the cost of that,
not of an integer kernel). Every model computes in fp32; the differences are the weights'. JSON to
bench/results/quant.json (CPU model and ISA flags recorded).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import write_results  # noqa: E402


def safetensors_bytes(directory: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))


def decode_tokens_per_second(model, prompt: list[int], new: int, repeats: int) -> float:
    """Engine decode rate at batch 1: (new - 1) tokens over the time a `new`-token generation takes beyond a
    1-token one (the prompt's prefill cancels out); median over `repeats` pairs."""
    from glm5.engine import LLM, SamplingParams

    llm = LLM(model)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))  # warm-up (fused weights, kernels)

    def timed(tokens: int) -> float:
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
        return time.perf_counter() - start

    rates = []
    for _ in range(repeats):
        one, many = timed(1), timed(new)
        rates.append((new - 1) / max(many - one, 1e-9))
    return statistics.median(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a trained model directory (default: the newest runs/*/model)")
    parser.add_argument("--work", default=None, help="where the converted checkpoints go (default: a temporary folder)")
    parser.add_argument("--ternary-steps", type=int, default=80, help="quantization-aware ternary training steps (default 80)")
    parser.add_argument("--ternary-seq-len", type=int, default=512, help="tokens per row of the ternary run (default 512)")
    parser.add_argument("--ternary-lr", type=float, default=5e-4, help="learning rate of the ternary run (default 5e-4)")
    parser.add_argument("--ternary-rl-steps", type=int, default=20, help="RL steps on the ternary-trained model (default 20)")
    parser.add_argument("--ternary-rl-lr", type=float, default=2e-4, help="its learning rate (default 2e-4)")
    parser.add_argument("--heldout-rows", type=int, default=24, help="held-out rows of each kind scored (default 24)")
    parser.add_argument("--tasks", type=int, default=30, help="held-out tool-call requests (default 30)")
    parser.add_argument("--decode-tokens", type=int, default=48, help="new tokens per decode timing (default 48)")
    parser.add_argument("--repeats", type=int, default=3, help="decode timings per format, median (default 3)")
    parser.add_argument("--calib-rows", type=int, default=16, help="calibration rows of 256 tokens (default 16)")
    parser.add_argument("--formats", nargs="+", default=None, help="a subset of the formats (default all)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "quant.json"), help="results JSON")
    args = parser.parse_args()

    from glm5.chat import render_messages
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.quant.convert import quantize_checkpoint_fp8
    from glm5.quant.load import load_any_checkpoint
    from glm5.quant.lowbit_convert import quantize_checkpoint_lowbit
    from glm5.tokenizer import Tokenizer
    from glm5.train.corpus import build_demo_corpus
    from glm5.train.data import pack_documents
    from glm5.train.evaluate import heldout_loss, tool_call_eval

    model_dir = args.model
    if model_dir is None:
        found = sorted(glob.glob(os.path.join(ROOT, "runs", "*", "model", "config.json")), key=os.path.getmtime)
        if not found:
            raise SystemExit("no runs/*/model: run `make demo` first or pass --model DIR")
        model_dir = os.path.dirname(found[-1])
    work = args.work or tempfile.mkdtemp(prefix="glm5-quant-bench-")
    os.makedirs(work, exist_ok=True)
    log = lambda message: print(f"[quant {time.perf_counter() - started:6.0f}s] {message}", flush=True)  # noqa: E731
    started = time.perf_counter()
    tokenizer = Tokenizer.from_pretrained(model_dir)
    corpus = build_demo_corpus(stdlib_bytes=2_500_000, conversations=2000, tasks=args.tasks, seed=0)
    eos = tokenizer.special_token_id("<|endoftext|>")
    heldout_text = pack_documents(tokenizer.encode_batch(corpus.heldout_texts), 512, eos)
    heldout_chats = pack_documents(tokenizer.encode_batch(corpus.heldout_chats, allow_special=True), 512, eos)
    tasks = [dict(t) for t in corpus.tasks]
    prompt = tokenizer.encode(render_messages(tasks[0]["messages"], tasks[0]["tools"]), allow_special=True)
    log(f"model {model_dir}; {len(heldout_text)} + {len(heldout_chats)} held-out rows, {len(tasks)} tasks")

    dirs: dict[str, str] = {}

    def path(name: str) -> str:
        return os.path.join(work, name.replace(" ", "-").replace("(", "").replace(")", ""))

    def make(name: str, build) -> None:
        if args.formats and name not in args.formats:
            return
        target = path(name)
        if os.path.exists(target):
            shutil.rmtree(target)
        t0 = time.perf_counter()
        build(target)
        dirs[name] = target
        log(f"{name}: written in {time.perf_counter() - t0:.0f} s, {safetensors_bytes(target) / 1e6:.2f} MB")

    def bf16(target):
        model = GLM5ForCausalLM.from_pretrained(model_dir).to(torch.bfloat16)
        model.save_pretrained(target)
        tokenizer.save(target)

    def ternary_trained(target):
        data = os.path.join(work, "ternary-data.jsonl")
        with open(data, "w", encoding="utf-8") as fh:
            for conversation in corpus.sft_train:
                fh.write(json.dumps(conversation) + "\n")
        run_dir = os.path.join(work, "ternary-run")
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "glm5.cli", "train", "sft", "--init", model_dir, "--data", data,
               "--out", run_dir, "--steps", str(args.ternary_steps), "--batch-size", "8", "--seq-len",
               str(args.ternary_seq_len), "--lr", str(args.ternary_lr), "--warmup", "5", "--ternary", "--no-progress",
               "--truncate"]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        shutil.copytree(os.path.join(run_dir, "model"), target)

    def ternary_rl(target):
        from glm5.rl.run import RLConfig, run_rl

        run_dir = os.path.join(work, "ternary-rl")
        shutil.rmtree(run_dir, ignore_errors=True)
        summary = run_rl(RLConfig(out=run_dir, init=path("ternary (trained)"), env="tool-call",
                                  env_kwargs={"final_answer": False}, algo="grpo", mode="april",
                                  steps=args.ternary_rl_steps, rollout_batch=4, group_size=4, max_new_tokens=48,
                                  over_sample=2.0, keep_partial_kv=True, max_staleness=1, lr=args.ternary_rl_lr,
                                  save_every=0, threads=torch.get_num_threads(), progress=False))
        log(f"ternary RL: reward {summary['reward_first']:.3f} -> {summary['reward_last']:.3f}")
        shutil.copytree(os.path.join(run_dir, "model"), target)

    make("bf16", bf16)
    make("fp8", lambda t: quantize_checkpoint_fp8(path("bf16") if "bf16" in dirs else model_dir, t))
    make("int4 RTN", lambda t: quantize_checkpoint_lowbit(model_dir, t, "int4", method="rtn"))
    make("int4 GPTQ", lambda t: quantize_checkpoint_lowbit(model_dir, t, "int4", method="gptq", calib_rows=args.calib_rows))
    make("q2 mix", lambda t: quantize_checkpoint_lowbit(model_dir, t, "q2", method="gptq", avg_bits=2.56, calib_rows=args.calib_rows))
    make("ternary (PTQ)", lambda t: quantize_checkpoint_lowbit(model_dir, t, "ternary"))
    make("ternary (trained)", ternary_trained)
    if "ternary (trained)" in dirs:
        make("ternary (trained + RL)", ternary_rl)

    rows = []
    reference_rate = None
    results = {"benchmark": "quant", "model": os.path.relpath(model_dir, ROOT),  # + "machine": write_results
               "threads": torch.get_num_threads(), "torch": torch.__version__, "ternary_steps": args.ternary_steps,
               "ternary_rl_steps": args.ternary_rl_steps,
               "heldout_rows": args.heldout_rows, "tasks": len(tasks), "decode_tokens": args.decode_tokens, "rows": rows}
    for name, directory in [("fp32 (source)", model_dir)] + list(dirs.items()):
        model = load_any_checkpoint(directory, dtype=torch.float32)
        qcfg = json.load(open(os.path.join(directory, "config.json"))).get("quantization_config") or {}
        ppl_text = math.exp(heldout_loss(model, heldout_text, max_rows=args.heldout_rows))
        ppl_chat = math.exp(heldout_loss(model, heldout_chats, max_rows=args.heldout_rows))
        calls = tool_call_eval(model, tokenizer, tasks)
        rate = decode_tokens_per_second(model, prompt, args.decode_tokens, args.repeats)
        reference_rate = reference_rate or rate
        row = {"format": name, "bytes": safetensors_bytes(directory), "avg_bits": qcfg.get("avg_bits"),
               "ppl_stdlib": round(ppl_text, 3), "ppl_chats": round(ppl_chat, 3),
               "tool_validity": calls["validity"], "tool_right": calls["tool_accuracy"], "tool_exact": calls["accuracy"],
               "decode_tok_s": round(rate, 1), "decode_vs_fp32": round(rate / reference_rate, 3)}
        rows.append(row)
        log(json.dumps(row))
        write_results(args.out, results)  # after every format: a long run leaves what it measured
    print("\n| format | MB on disk | bits/weight (quantized) | ppl stdlib | ppl chats | tool valid / right / exact | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['bytes'] / 1e6:.2f} | {r['avg_bits'] or '-'} | {r['ppl_stdlib']:.2f} | {r['ppl_chats']:.3f} | "
              f"{r['tool_validity']:.2f} / {r['tool_right']:.2f} / {r['tool_exact']:.2f} | {r['decode_tok_s']:.0f} ({r['decode_vs_fp32']:.2f}x) |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
