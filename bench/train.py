"""Training-step benchmark: glm5's step against transformers' GlmMoeDsaForCausalLM, same config and batch.

    .venv/bin/python bench/train.py                       # tiny-bench config, batch 8 x 512, fp32 + bf16
    .venv/bin/python bench/train.py --repeats 7 --threads 2

One step = forward + backward + AdamW update on the next-token loss (no MTP: transformers has none; both
sides use the AdamW kernel glm5.train picks, `adamw_kernel`: fused on cpu / cuda; each side its own loss:
glm5's `model(ids, targets=ids).lm_loss_sum` as glm5.train computes it, transformers' `labels=`), same
random weights in both (ours copied into transformers; ours with `MLAttention.sparse_as_mask` set as glm5.train
sets it for the sparse stage: the top-k as a mask over dense latent attention, or, where the CPU kernels of
glm5.kernels run, their sparse attention, forward and backward), the `tiny-bench` preset (vocab 4096,
hidden 256, 4 layers, 16 experts top-4; DSA top-64, so at 512 tokens each query attends to 64 keys). The two sides
alternate step by step so machine load hits both alike; medians of --repeats timed steps after a warm-up.
MFU is against the matmul peak measured in this same run (2048^3 torch.matmul, median), per dtype:
    model FLOPs per token = 6 * (active non-embedding params - indexer) + 2 * indexer params
                            + 12 * layers * heads * head_dim * min(index_topk, seq)
                            + 2 * indexer layers * index heads * index_head_dim * seq
(nanochat's estimate, with DSA's attention over the top-k keys as nanochat caps a sliding window; head_dim =
mean of the q/k and v widths; the indexer, whose top-k passes no gradient, forward only, scoring every key).
An earlier version's attention term used all seq keys and the indexer 6 FLOPs per weight: 37.1M vs 31.8M
FLOPs per token at 512 (MFU 1.17x too high), 55.9M vs 35.0M at 2048 (1.60x).
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from results_io import write_results  # bench/ is on sys.path when a bench runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul_peak(dtype, repeats: int = 5, n: int = 2048) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def flops_per_token(cfg, seq: int) -> float:
    """Model FLOPs per trained token of a DSA model (see the module docstring)."""
    import torch

    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.params import count_parameters

    active = count_parameters(cfg)["active_params_excluding_embeddings"]
    with torch.device("meta"):
        model = GLM5ForCausalLM(cfg)
    # the indexer's top-k is not differentiable: its weights run forward only (2 FLOPs each, not 6)
    indexer = sum(p.numel() for n, p in model.named_parameters() if ".indexer." in n and not n.startswith("mtp."))
    indexed_layers = sum(cfg.has_indexer(i) for i in range(cfg.num_hidden_layers))
    head_dim = (cfg.qk_head_dim + cfg.v_head_dim) / 2
    keys = min(cfg.index_topk, seq)  # each query attends to its top-k (nanochat: min(window, seq))
    return (6 * (active - indexer) + 2 * indexer
            + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * keys
            + 2 * indexed_layers * cfg.index_n_heads * cfg.index_head_dim * seq)  # indexer scores: all keys, forward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per row (default 512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--allocator", choices=["keep", "default"], default="keep",
                        help="keep: glm5.common.keep_freed_memory() for the whole process, both sides (default); "
                             "default: glibc as is (big tensors page-fault every step)")
    parser.add_argument("--out", default="bench/results/train.json", help="where to write the JSON results")
    args = parser.parse_args()

    import torch
    from transformers import GlmMoeDsaForCausalLM

    from glm5.checkpoint import to_transformers_config
    from glm5.common import keep_freed_memory
    from glm5.config import GLM5Config
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.train.optim import adamw_kernel

    torch.set_num_threads(args.threads)
    if args.allocator == "keep":
        keep_freed_memory()  # the same allocator setting for both sides (see glm5.common)
    torch.manual_seed(0)
    cfg = GLM5Config.from_preset("tiny-bench")
    ours = GLM5ForCausalLM(cfg)
    for layer in ours.model.layers:  # our training step as glm5.train runs it: DSA's top-k applied as a mask
        layer.self_attn.sparse_as_mask = True
    theirs = GlmMoeDsaForCausalLM(to_transformers_config(cfg, "sdpa"))
    missing, unexpected = theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("mtp.")}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    tokens = args.batch * args.seq

    targets = int((ids[:, 1:] >= 0).sum())

    def our_step(model, opt, dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            # as glm5.train's step: summed losses from the hidden states (glm5.model.loss), no logits tensor
            total = model(ids, targets=ids).lm_loss_sum
        (total / targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def their_step(model, opt, dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            # transformers' own loss (shifts the labels, not the logits: no copy of the [B, T, V] logits)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    per_token = flops_per_token(cfg, args.seq)
    results = {"config": "tiny-bench", "batch": args.batch, "seq": args.seq, "threads": args.threads,
               "allocator": args.allocator,
               "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "matmul_peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
               "model_flops_per_token": per_token, "runs": {}}
    for dtype in ("float32", "bfloat16"):
        sides = {"glm5": (ours, our_step), "transformers": (theirs, their_step)}
        opts = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_kernel(list(model.named_parameters())))
                for name, (model, _) in sides.items()}
        for name, (model, step) in sides.items():  # warm-up
            model.train()
            step(model, opts[name], dtype)
        times = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, (model, step) in sides.items():
                t0 = time.perf_counter()
                step(model, opts[name], dtype)
                times[name].append(time.perf_counter() - t0)
        for name in sides:
            median = statistics.median(times[name])
            run = {"median_s": median, "tokens_per_s": tokens / median,
                   "gflops": per_token * tokens / median / 1e9,
                   "mfu": per_token * tokens / median / peaks[dtype], "times_s": times[name]}
            results["runs"][f"{name}/{dtype}"] = run
            print(f"{name:>12} {dtype:>8}: {median * 1000:8.0f} ms/step  {run['tokens_per_s']:8.0f} tok/s  "
                  f"{run['gflops']:6.1f} GFLOP/s  MFU {run['mfu'] * 100:5.1f}% (peak {peaks[dtype] / 1e9:.0f})", flush=True)
        ratio = results["runs"][f"transformers/{dtype}"]["median_s"] / results["runs"][f"glm5/{dtype}"]["median_s"]
        results[f"speedup_{dtype}"] = ratio
        print(f"{'':>12} {dtype:>8}: glm5 is {ratio:.2f}x transformers' speed", flush=True)
    best = results["runs"]["glm5/bfloat16"]["tokens_per_s"] / results["runs"]["transformers/float32"]["tokens_per_s"]
    results["speedup_best_glm5_vs_transformers_fp32"] = best
    print(f"glm5 best (bf16) vs transformers fp32 (the machine.md baseline): {best:.2f}x")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
