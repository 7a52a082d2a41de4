"""Decode speed and time to first token: the glm5 engine against transformers' `generate` and llama.cpp, same
weights, same threads.

    .venv/bin/python bench/generate.py                      # tiny-bench config, prompt 128 + 128 new, batch 1 and 8
    .venv/bin/python bench/generate.py --batch 1 --new 64 --reps 5
    .venv/bin/python bench/generate.py --no-llamacpp        # glm5 and transformers only
    python bench/generate.py --device cuda                  # on a GPU: glm5 with CUDA graphs and glm5 eager

Both run greedy in fp32 (or --dtype) on the same GlmMoeDsaForCausalLM / GLM5ForCausalLM weights (transformers
with sdpa attention and its default DynamicCache). Runs alternate (transformers, glm5, transformers, ...) so a
busy machine slows both alike; medians are reported. Every repetition feeds fresh random prompts (the same to
both), so the engine, built once per batch size, never reuses a cached prefix. On CUDA the engine's decode
graphs (the prefill's shape and every decode shape) are captured before timing (reported as graph_capture_s), and the engine also
runs with cuda_graphs=False as "glm5_eager". On a CPU the engine also runs with compiled decode steps as
"glm5_compiled" (glm5/engine/compiled.py; compiled before timing, both branches of the batch's bucket,
reported as compile_s; --no-compiled leaves it out), timed in the same alternation, and with --decode-steps N
(default 4) as "glm5_compiled_steps": the same, N greedy decode steps per compiled call (tokens arrive N at a
time; `speedup_decode_steps`, and `speedup_decode_steps_vs_compiled_paired` against one step per call). Inductor sums in its own
order, so its tokens may part from transformers' where a near tie rounds the other way, in the final logits or
in a discrete choice before them (a router's or DSA's top-k at random init): such sequences are recorded
(compiled_same_tokens, compiled_differences: the reference forward's logit gap where they part), not fatal. Both sides' new tokens are compared: in fp32 on a CPU a
difference stops the benchmark (the timings would compare different work) unless the reference forward's two
candidate logits at the first difference are within 1e-4 of their scale, or the reference forward up to it has
a near tie in a discrete choice (a router's or DSA's top-k whose k-th and (k+1)-th scores are within 1e-5 of
their scale: `peer.discrete_near_ties`), ties that summation orders round either way (recorded: `near_ties`,
`sequences_at_near_ties`); otherwise it is recorded (`same_tokens`, `token_mismatches`). Each side is timed in one run per repetition: transformers' first token
and each later one are stamped by a streamer inside its one `generate` call.

llama.cpp (llama-cpp-python; on --device cpu, skipped with the reason printed when it cannot be imported, or with
--no-llamacpp) is what a laptop user would run instead: the same random weights exported by glm5's GGUF exporter
in f32 to a temporary directory, f32 K/V caches, n_threads = n_threads_batch = --threads, the same prompts, timed
in the same alternation. Batch 1 runs llama.cpp's eval loop on one sequence; batch N > 1 runs the N sequences
together through llama.cpp's batch API (one llama_batch with sequence ids 0..N-1 per step, a K/V stream per
sequence), as llama.cpp's server decodes parallel slots. Its greedy tokens are compared with glm5's: where they
part, the first position and both sides' logit gaps between the two candidates are recorded (`llamacpp.
first_mismatch`; llama.cpp's logits there are recomputed on one sequence, so after a batched run its gap can be
negative: its batched and one-sequence arithmetic broke the tie differently): at random init DSA's top-k and the
router have near-ties that fp32 summation orders break either way (dev/LOG.md, GGUF export and llama.cpp parity). Metrics, per batch size:
  ttft_s          time to the first new token (the prefill), median
  decode_tok_s    new tokens after the first / time after the first
  e2e_tok_s       all new tokens / total time (new tokens/s end to end)
and the ratios glm5 / transformers (speedup_decode, speedup_e2e, ttft_ratio; speedup_decode_compiled and
speedup_e2e_compiled for glm5_compiled) and glm5 / llama.cpp
(speedup_decode_vs_llamacpp, speedup_e2e_vs_llamacpp, ttft_ratio_vs_llamacpp): ratios of the sides' medians.
The `_paired` decode ratios (speedup_decode_paired, speedup_decode_compiled_paired,
speedup_decode_compiled_vs_llamacpp_paired) are the median over repetitions of each repetition's own ratio,
the two sides timed seconds apart: on a shared machine whose speed drifts over minutes, the steadier figure.
Writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from llamacpp_peer import (
    BatchedLlama,
    describe_mismatch,
    export_model,
    first_mismatch,
    import_llama_cpp,
    open_llama,
    run_llama,
)
from peer import discrete_near_ties, lowest_position_topk  # bench/ is on sys.path when a bench runs
from results_io import describe_cpu, write_results

from glm5.engine.config import EngineConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TokenClock:
    """A `generate(streamer=...)`: transformers calls put() with the prompt, then once per generated step with
    that step's tokens (already on the host for the stopping check), and end() at the end. So one generate call
    gives the time to the first token and the decode time after it, each measured on its own, as the engine's
    side is (not a 1-token call's time subtracted from another call's)."""

    def __init__(self, device: torch.device):
        self.device, self.stamps, self.calls = device, [], 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            _sync(self.device)
            self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_transformers(twin, prompts: torch.Tensor, new: int) -> tuple[float, float, list[list[int]]]:
    """(time to the first new token, total time, the new tokens per prompt), one generate call."""
    clock = _TokenClock(prompts.device)
    _sync(prompts.device)
    t = time.perf_counter()
    # the prompts are unpadded: an explicit all-ones mask, else generate infers one from pad_token_id and masks out
    # every prompt token that happens to be id 0 (random prompts draw it: transformers then continues another text)
    out = twin.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0, streamer=clock)
    _sync(prompts.device)
    total = time.perf_counter() - t
    assert out.shape[1] == prompts.shape[1] + new and len(clock.stamps) == new, (out.shape, len(clock.stamps))
    return clock.stamps[0] - t, total, out[:, prompts.shape[1]:].tolist()


def first_difference(a: list[int], b: list[int]) -> int:
    """The first new token at which two continuations differ (the shorter's length when one extends the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def differing_sequences(model, prompts: torch.Tensor, ours: list[list[int]], reference: list[list[int]]):
    """(sequence, first difference, None at a near tie of the final logits else why not) for each sequence whose
    tokens differ from the reference's: `greedy_difference`, the parity tests' rule (untimed)."""
    from conftest import greedy_difference

    for seq, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            yield seq, first_difference(a, b), greedy_difference(model, prompts[seq].tolist(), a, b)


def discrete_tie(model, tokens: list[int]) -> str | None:
    """Where the reference forward over `tokens` has a near tie in a discrete choice before the logits (a
    router's or DSA's top-k, `peer.discrete_near_ties`: the k-th and (k+1)-th scores within 1e-5 of their
    scale), the nearest as a phrase; None when it has none (untimed)."""
    ties = discrete_near_ties(model, tokens)
    if not ties:
        return None
    t = ties[0]
    return (f"a near tie in a discrete choice before the logits: {t['choice']} {t['layer']}'s top-k at position "
            f"{t['position']} of {len(tokens)}, its k-th and (k+1)-th scores {t['relative']:.1e} of their scale apart")


def same_tokens(ours: list[list[int]], theirs: list[list[int]]) -> str | None:
    """None when both sides produced the same tokens, else where they first differ."""
    for row, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            at = first_difference(a, b)
            return f"sequence {row}: first difference at new token {at} (glm5 {a[at:at + 4]}, transformers {b[at:at + 4]})"
    return None if len(ours) == len(theirs) else f"{len(ours)} vs {len(theirs)} sequences"


def run_glm5(engine, prompts: list[list[int]], new: int) -> tuple[float, float, list[list[int]]]:
    """(time to the first token of every sequence, total time, the new tokens per prompt). Every step ends in
    the sampler's copy of the tokens to the host: the clock sees finished work."""
    from glm5.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    t = time.perf_counter()
    ids = [engine.add_request(p, params).request_id for p in prompts]
    first = None
    tokens: dict = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
        if first is None and all(tokens.values()):
            first = time.perf_counter() - t
    total = time.perf_counter() - t
    assert sum(map(len, tokens.values())) == new * len(prompts)
    return first, total, [tokens[i] for i in ids]


def run_llamacpp(llama, prompts: list[list[int]], new: int) -> tuple[float, float, list[list[int]]]:
    """(time to the first token of every sequence, total time, the new tokens per prompt) from llama.cpp: a Llama
    (one prompt, its eval loop) or a BatchedLlama (every prompt in one llama_batch per step)."""
    if isinstance(llama, BatchedLlama):
        return llama.run(prompts, new)
    assert len(prompts) == 1, "llama.cpp's eval loop runs one sequence"
    first, total, tokens = run_llama(llama, prompts[0], new)
    return first, total, [tokens]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-bench", help="model config preset (random weights)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions (median reported)")
    # the engine's flags (--device, --dtype, --threads, --block-size, --enforce-eager, ...): both models on
    # --device in --dtype; cache and batch sizes are set per batch below
    # --decode-steps N (default 4 here): on a CPU, also the compiled engine with N greedy decode steps per call
    # (glm5_compiled_steps; 1 leaves it out); the other engines decode one step per call
    EngineConfig.add_arguments(parser, device="cpu", dtype="float32", threads=2, decode_steps=4)
    parser.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out (glm5 and transformers only)")
    parser.add_argument("--no-compiled", action="store_true",
                        help="on a CPU, leave out the engine with compiled decode steps (glm5_compiled)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "generate.json"))
    args = parser.parse_args()
    from conftest import transformers_twin  # (sets 2 threads on import: set ours after it)

    engine_config = EngineConfig.from_args(args)
    torch.set_num_threads(args.threads)

    from glm5 import GLM5Config, GLM5ForCausalLM
    from glm5.engine import LLMEngine

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = GLM5Config.from_preset(args.preset)
    model = GLM5ForCausalLM(cfg).eval()
    twin = transformers_twin(model, "sdpa").to(device=device, dtype=dtype)
    work = tempfile.TemporaryDirectory(prefix="glm5-bench-generate-")
    gguf, single, skipped = None, None, None
    if args.no_llamacpp:
        skipped = "--no-llamacpp"
    elif device.type != "cpu":
        skipped = f"llama.cpp runs on the CPU here, glm5 on {device}: not the same hardware"
    else:
        llama_cpp, skipped = import_llama_cpp()
    if skipped is None:
        from glm5.quant.gguf import GGUFExportError

        try:  # the fp32 weights glm5 and transformers run, before any cast
            gguf = export_model(model, work.name, "f32")
        except (GGUFExportError, ValueError) as err:
            skipped = f"the {args.preset} model cannot be exported to GGUF: {err}"
    if skipped is not None:
        print(f"[bench] llama.cpp skipped: {skipped}", flush=True)
    else:
        # one sequence: timed at batch 1, and the teacher-forced logits behind a mismatch report at every batch
        single = open_llama(gguf, n_ctx=args.prompt + args.new + 8, n_batch=args.prompt, threads=args.threads)
        print(f"[bench] llama.cpp: llama-cpp-python {llama_cpp.__version__}, {gguf.name} "
              f"({gguf.stat().st_size / 2**20:.1f} MiB), f32 caches, {args.threads} threads", flush=True)
    model = model.to(device=device, dtype=dtype)
    print(f"[bench] cpu: {describe_cpu()}", flush=True)
    results = {"config": args.preset, "prompt_tokens": args.prompt, "new_tokens": args.new, "threads": args.threads,
               "device": str(device), "dtype": args.dtype, "torch": torch.__version__,
               "llama_cpp_python": None if single is None else llama_cpp.__version__, "llamacpp_skipped": skipped,
               "runs": {}}
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)

        batch_config = engine_config.replace(
            max_num_seqs=max(8, batch), max_num_batched_tokens=max(512, batch * args.prompt),
            kv_cache_tokens=(args.reps + 2) * batch * (args.prompt + args.new) + 256)

        def make_engine(batch_config=batch_config, **changes):
            return LLMEngine(model, batch_config.replace(**changes))

        engines = {"glm5": make_engine(compile=False, decode_steps=1)}
        if device.type == "cuda":
            engines["glm5_eager"] = make_engine(cuda_graphs=False)
        compile_s = steps_compile_s = None
        if device.type == "cpu" and not args.no_compiled:
            engines["glm5_compiled"] = make_engine(compile=True, cuda_graphs=False, decode_steps=1)
            t = time.perf_counter()
            engines["glm5_compiled"].compiled.warm_up([batch])  # both branches of this batch's bucket
            compile_s = time.perf_counter() - t
            print(f"  compiled the decode steps ({engine_config.compile_mode}) in {compile_s:.1f} s", flush=True)
            if args.decode_steps > 1:
                engines["glm5_compiled_steps"] = make_engine(compile=True, cuda_graphs=False,
                                                             decode_steps=args.decode_steps)
                t = time.perf_counter()
                engines["glm5_compiled_steps"].compiled.warm_up([batch])
                steps_compile_s = time.perf_counter() - t
                print(f"  compiled {args.decode_steps} decode steps per call in {steps_compile_s:.1f} s", flush=True)
        capture_s = None
        if engines["glm5"].graphs is not None:
            t = time.perf_counter()
            engines["glm5"].graphs.capture(batch, args.prompt, args.prompt)  # the prefill step's shape
            n_graphs = engines["glm5"].graphs.capture_decode(args.prompt + args.new, [batch])
            capture_s = time.perf_counter() - t
            print(f"  captured {n_graphs} CUDA graphs (prefill and decode) in {capture_s:.2f} s", flush=True)
        llama, llama_mode = None, None
        if single is not None and batch == 1:
            llama, llama_mode = single, "one sequence, llama.cpp's eval loop"
        elif single is not None:
            llama = BatchedLlama(gguf, n_seq=batch, n_ctx_seq=args.prompt + args.new + 8, n_batch=batch * args.prompt,
                                 threads=args.threads)
            llama_mode = f"{batch} sequences decoded together: one llama_batch (sequence ids 0-{batch - 1}) per step"
        warm = torch.randint(0, cfg.vocab_size, (batch, 8), generator=gen)
        run_transformers(twin, warm.to(device), 2)  # warm-up all (both paths: prefill and decode)
        for engine in engines.values():
            run_glm5(engine, warm.tolist(), 2)
        if llama is not None:
            run_llamacpp(llama, warm.tolist(), 2)
        times: dict[str, list] = {"transformers": [], **{name: [] for name in engines}}
        if llama is not None:
            times["llamacpp"] = []
        mismatches, llama_mismatches, llama_first, near_ties = [], [], None, []
        differences = {"glm5_compiled": [], "glm5_compiled_steps": []}  # the compiled engines' (recorded)
        compiled_differences = differences["glm5_compiled"]
        for _ in range(args.reps):
            prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt), generator=gen)  # fresh: no prefix hits
            times["transformers"].append(run_transformers(twin, prompts.to(device), args.new)[:2])
            with lowest_position_topk():  # untimed: transformers' tokens under glm5's tie rule
                reference = run_transformers(twin, prompts.to(device), args.new)[2]
            for name, engine in engines.items():
                ttft, total, tokens = run_glm5(engine, prompts.tolist(), args.new)
                times[name].append((ttft, total))
                if (differ := same_tokens(tokens, reference)) is not None and name in differences:
                    # the compiled step sums in inductor's order: where its tokens part from transformers', the
                    # reference forward's logit gap there says whether the final logits were a near tie, or a
                    # discrete choice before them (a router's or DSA's top-k) was (untimed; recorded)
                    for seq, at, problem in differing_sequences(model, prompts, tokens, reference):
                        tie = problem and discrete_tie(model, prompts[seq].tolist() + reference[seq][:at])
                        differences[name].append(f"sequence {seq}: " + (f"{tie}; " if tie else "")
                                                 + (problem or "a near tie of the final logits"))
                elif differ is not None and device.type == "cpu" and args.dtype == "float32":
                    # fp32 on a CPU: a sequence may part only at a near tie that summation orders round either
                    # way: of the final logits (the parity tests' rule: the reference forward's two logits within
                    # 1e-4 of their scale) or of a discrete choice before them (`discrete_tie`); anything else
                    # stops the benchmark below
                    for seq, at, problem in differing_sequences(model, prompts, tokens, reference):
                        if problem is None:
                            near_ties.append(f"{name}: sequence {seq}: first difference at new token {at}, a near tie "
                                             "of the final logits")
                        elif tie := discrete_tie(model, prompts[seq].tolist() + reference[seq][:at]):
                            near_ties.append(f"{name}: sequence {seq}: first difference at new token {at}, {tie}")
                        else:
                            mismatches.append(f"{name}: sequence {seq}: {problem}")
                elif differ is not None:
                    mismatches.append(f"{name}: {differ}")
                if name == "glm5":
                    ours = tokens
            if llama is not None:
                ttft, total, theirs = run_llamacpp(llama, prompts.tolist(), args.new)
                times["llamacpp"].append((ttft, total))
                for seq, (a, b) in enumerate(zip(ours, theirs)):
                    if a != b:  # untimed: where they part, and how near a tie it was on each side
                        where = first_mismatch(model, single, prompts[seq].tolist(), a, b)
                        llama_mismatches.append(f"sequence {seq}: first difference at new token {where['at']}")
                        if llama_first is None:
                            llama_first = {"sequence": seq, **where}
        if mismatches and args.dtype == "float32" and device.type == "cpu":
            # greedy fp32 on the same weights must agree token for token, or the timings compare different work
            raise SystemExit(f"batch {batch}: glm5 and transformers generated different tokens: {mismatches[0]}")

        def decode_rates(runs, batch=batch):  # new tokens after the first / time after the first, per repetition
            return [batch * (args.new - 1) / max(r[1] - r[0], 1e-9) for r in runs]

        def summary(runs, batch=batch):
            ttft = statistics.median(r[0] for r in runs)
            total = statistics.median(r[1] for r in runs)
            return {"ttft_s": ttft, "decode_tok_s": statistics.median(decode_rates(runs)),
                    "e2e_tok_s": batch * args.new / total, "total_s": total}

        def paired(name, other, times=times):  # median over repetitions of the two sides' decode rates, timed seconds apart
            return statistics.median(a / b for a, b in zip(decode_rates(times[name]), decode_rates(times[other])))

        print("  runs (ttft, total):", {name: [tuple(round(x, 4) for x in r) for r in runs] for name, runs in times.items()})
        row = {name: summary(runs) for name, runs in times.items()}
        if llama is not None:
            row["llamacpp"].update(mode=llama_mode, gguf_type="f32", same_tokens=not llama_mismatches,
                                   sequences_differing=len(llama_mismatches), token_mismatches=llama_mismatches[:4],
                                   first_mismatch=llama_first)
            row["speedup_decode_vs_llamacpp"] = row["glm5"]["decode_tok_s"] / row["llamacpp"]["decode_tok_s"]
            row["speedup_e2e_vs_llamacpp"] = row["glm5"]["e2e_tok_s"] / row["llamacpp"]["e2e_tok_s"]
            row["ttft_ratio_vs_llamacpp"] = row["llamacpp"]["ttft_s"] / row["glm5"]["ttft_s"]
            if llama is not single:
                llama.close()
        # fp32 on a CPU must match (checked above); bf16 or GPU kernels may round a near-tie the other way
        row["same_tokens"] = not mismatches and not near_ties
        row["token_mismatches"] = mismatches[:4]
        row["near_ties"] = near_ties[:4]
        row["sequences_at_near_ties"] = len(near_ties)
        if "glm5_compiled" in row:
            compiled = engines["glm5_compiled"].compiled
            row["compile_s"] = compile_s
            row["compiled_steps"] = compiled.num_runs
            row["compile_failure"] = compiled.failed
            row["compiled_same_tokens"] = not compiled_differences
            row["compiled_sequences_differing"] = len(compiled_differences)
            row["compiled_differences"] = [d[:300] for d in compiled_differences[:4]]
            row["speedup_decode_compiled"] = row["glm5_compiled"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
            row["speedup_e2e_compiled"] = row["glm5_compiled"]["e2e_tok_s"] / row["transformers"]["e2e_tok_s"]
            row["speedup_decode_compiled_paired"] = paired("glm5_compiled", "transformers")
            if llama is not None:
                row["speedup_decode_compiled_vs_llamacpp"] = (row["glm5_compiled"]["decode_tok_s"]
                                                              / row["llamacpp"]["decode_tok_s"])
                row["speedup_decode_compiled_vs_llamacpp_paired"] = paired("glm5_compiled", "llamacpp")
        if "glm5_compiled_steps" in row:
            steps = row["glm5_compiled_steps"]
            row["decode_steps"] = args.decode_steps
            row["steps_compile_s"] = steps_compile_s
            row["steps_calls"] = engines["glm5_compiled_steps"].compiled.num_runs
            row["steps_same_tokens"] = not differences["glm5_compiled_steps"]
            row["steps_differences"] = [d[:300] for d in differences["glm5_compiled_steps"][:4]]
            row["speedup_decode_steps"] = steps["decode_tok_s"] / row["transformers"]["decode_tok_s"]
            row["speedup_decode_steps_paired"] = paired("glm5_compiled_steps", "transformers")
            row["speedup_decode_steps_vs_compiled_paired"] = paired("glm5_compiled_steps", "glm5_compiled")
            if llama is not None:
                row["speedup_decode_steps_vs_llamacpp_paired"] = paired("glm5_compiled_steps", "llamacpp")
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
        row["speedup_decode_paired"] = paired("glm5", "transformers")
        row["speedup_e2e"] = row["glm5"]["e2e_tok_s"] / row["transformers"]["e2e_tok_s"]
        row["ttft_ratio"] = row["transformers"]["ttft_s"] / row["glm5"]["ttft_s"]
        results["runs"][f"batch{batch}"] = row
        print(f"batch {batch}: decode tok/s  transformers {row['transformers']['decode_tok_s']:8.1f}  "
              f"glm5 {row['glm5']['decode_tok_s']:8.1f}  ({row['speedup_decode']:.2f}x)   "
              f"e2e {row['transformers']['e2e_tok_s']:.1f} vs {row['glm5']['e2e_tok_s']:.1f} ({row['speedup_e2e']:.2f}x)   "
              f"TTFT {row['transformers']['ttft_s'] * 1e3:.1f} ms vs {row['glm5']['ttft_s'] * 1e3:.1f} ms "
              f"({row['ttft_ratio']:.2f}x)", flush=True)
        for tie in near_ties[:2]:
            print(f"         {tie[:300]}", flush=True)
        if llama is not None:
            lc, first = row["llamacpp"], llama_first
            print(f"         llama.cpp ({llama_mode}): decode tok/s {lc['decode_tok_s']:8.1f}, glm5 "
                  f"{row['speedup_decode_vs_llamacpp']:.2f}x   e2e {lc['e2e_tok_s']:.1f} ({row['speedup_e2e_vs_llamacpp']:.2f}x)"
                  f"   TTFT {lc['ttft_s'] * 1e3:.1f} ms ({row['ttft_ratio_vs_llamacpp']:.2f}x)   same tokens as glm5: "
                  + ("yes" if first is None else f"{batch * args.reps - len(llama_mismatches)} of {batch * args.reps} "
                     f"sequences\n           first difference, sequence {first['sequence']}: {describe_mismatch(first)}"),
                  flush=True)
        if "glm5_compiled" in row:
            gc = row["glm5_compiled"]
            print(f"         glm5 compiled decode steps: decode tok/s {gc['decode_tok_s']:8.1f} "
                  f"({row['speedup_decode_compiled']:.2f}x transformers, paired by repetition "
                  f"{row['speedup_decode_compiled_paired']:.2f}x"
                  + (f", {row['speedup_decode_compiled_vs_llamacpp']:.2f}x llama.cpp" if llama is not None else "")
                  + f")   e2e {gc['e2e_tok_s']:.1f} ({row['speedup_e2e_compiled']:.2f}x)   "
                  f"{row['compiled_steps']} compiled steps" + (f"; FAILED: {row['compile_failure']}"
                                                              if row["compile_failure"] else "")
                  + (f"; same tokens as transformers: {batch * args.reps - len(compiled_differences)} of "
                     f"{batch * args.reps} sequences" if compiled_differences else "; same tokens as transformers"),
                  flush=True)
            for difference in compiled_differences[:2]:
                print(f"           {difference[:300]}", flush=True)
        if "glm5_compiled_steps" in row:
            print(f"         glm5 compiled, {args.decode_steps} steps per call: decode tok/s "
                  f"{row['glm5_compiled_steps']['decode_tok_s']:8.1f} ({row['speedup_decode_steps']:.2f}x transformers, "
                  f"paired {row['speedup_decode_steps_paired']:.2f}x; {row['speedup_decode_steps_vs_compiled_paired']:.2f}x "
                  f"one step per call)   {row['steps_calls']} calls; same tokens as transformers: "
                  + ("yes" if row["steps_same_tokens"] else f"{batch * args.reps - len(differences['glm5_compiled_steps'])}"
                     f" of {batch * args.reps} sequences"), flush=True)
            for difference in differences["glm5_compiled_steps"][:2]:
                print(f"           {difference[:300]}", flush=True)
        if "glm5_eager" in row:
            print(f"         glm5 without CUDA graphs: decode tok/s {row['glm5_eager']['decode_tok_s']:8.1f} "
                  f"({row['speedup_decode_eager']:.2f}x)  TTFT {row['glm5_eager']['ttft_s'] * 1e3:.1f} ms", flush=True)
    if single is not None:
        single.close()
    work.cleanup()
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
