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
At seq <= index_topk the indexer does not run (DSA keeps every key), so neither indexer term is counted.
The untimed first step of each side is compared: same weights and batch, so the losses must agree within
the dtype's rounding (both with glm5's tie rule for the DSA top-k, bench/peer.py) or the benchmark stops.
MFU is also given against a datasheet peak when --datasheet-gflops names it.
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from peer import lowest_position_topk  # bench/ is on sys.path when a bench runs
from results_io import describe_cpu, write_results

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
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * keys
    if not indexer_runs(cfg, seq):  # every key is selected: plain causal attention, the indexer never runs
        return 6 * (active - indexer) + attention
    return (6 * (active - indexer) + 2 * indexer + attention
            + 2 * indexed_layers * cfg.index_n_heads * cfg.index_head_dim * seq)  # indexer scores: all keys, forward


def indexer_runs(cfg, seq: int) -> bool:
    """Whether the lightning indexer runs at this length: at seq <= index_topk DSA keeps every key, and glm5's
    sparse path skips the indexer (no FLOPs to count)."""
    return seq > cfg.index_topk


def losses_agree(ours: float, theirs: float, dtype: str) -> bool:
    """The first step's losses (same weights, same batch, before any update): fp32 sums the same terms in another
    order (~1e-6 relative); bf16 autocast rounds each op to 8 mantissa bits (~0.4 %, compounded over the layers,
    ~1 %). A model that is not the same is off by O(1)."""
    return abs(ours - theirs) <= (1e-5 if dtype == "float32" else 3e-2) * abs(theirs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per row (default 512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--allocator", choices=["keep", "default"], default="keep",
                        help="keep: glm5.common.keep_freed_memory() for the whole process, both sides (default); "
                             "default: glibc as is (big tensors page-fault every step)")
    parser.add_argument("--datasheet-gflops", nargs=2, type=float, metavar=("FP32", "BF16"), default=None,
                        help="the CPU's datasheet peak GFLOP/s for the threads used (cores x GHz x FLOPs per cycle), "
                             "fp32 and bf16: MFU is then also given against it (default: only the measured peak)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                        help="compute dtypes to time (default both)")
    parser.add_argument("--out", default="bench/results/train.json", help="where to write the JSON results")
    args = parser.parse_args()
    args.datasheet_gflops = dict(zip(("float32", "bfloat16"), args.datasheet_gflops or ()))

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

    def our_step(model, opt, dtype) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            # as glm5.train's step: summed losses from the hidden states (glm5.model.loss), no logits tensor
            loss = model(ids, targets=ids).lm_loss_sum / targets
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def their_step(model, opt, dtype) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            # transformers' own loss (shifts the labels, not the logits: no copy of the [B, T, V] logits)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    peaks = {dtype: matmul_peak(getattr(torch, dtype)) for dtype in args.dtypes}
    per_token = flops_per_token(cfg, args.seq)
    results = {"config": "tiny-bench", "batch": args.batch, "seq": args.seq, "threads": args.threads,
               "allocator": args.allocator,
               "repeats": args.repeats,
               "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "matmul_peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
               "matmul_peak_note": "median of 2048^3 torch.matmul in this run",
               "datasheet_peak_gflops": args.datasheet_gflops or None, "indexer_runs": indexer_runs(cfg, args.seq),
               "model_flops_per_token": per_token, "runs": {}}
    print(f"[bench] cpu: {describe_cpu()}; measured matmul peak "
          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)
    for dtype in args.dtypes:
        sides = {"glm5": (ours, our_step), "transformers": (theirs, their_step)}
        opts = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_kernel(list(model.named_parameters())))
                for name, (model, _) in sides.items()}
        first = {}
        for name, (model, step) in sides.items():  # warm-up = the first step, untimed: its losses are compared
            model.train()
            # (both sides have taken the same steps so far; DSA's exact top-k ties kept by glm5's rule on both)
            with lowest_position_topk():
                first[name] = float(step(model, opts[name], dtype))
        results[f"first_step_loss_{dtype}"] = first
        print(f"{'':>12} {dtype:>8}: first-step loss glm5 {first['glm5']:.6f}, transformers {first['transformers']:.6f}",
              flush=True)
        if not losses_agree(first["glm5"], first["transformers"], dtype):
            raise SystemExit(f"{dtype}: the first step's losses differ (glm5 {first['glm5']:.6f}, transformers "
                             f"{first['transformers']:.6f}): the two sides do not train the same model")
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
            datasheet = args.datasheet_gflops.get(dtype)
            if datasheet:
                run["mfu_datasheet"] = run["gflops"] / datasheet
            results["runs"][f"{name}/{dtype}"] = run
            print(f"{name:>12} {dtype:>8}: {median * 1000:8.0f} ms/step  {run['tokens_per_s']:8.0f} tok/s  "
                  f"{run['gflops']:6.1f} GFLOP/s  MFU {run['mfu'] * 100:5.1f}% of the measured {peaks[dtype] / 1e9:.0f}"
                  + (f", {run['mfu_datasheet'] * 100:5.1f}% of the datasheet {datasheet:.0f}" if datasheet else ""),
                  flush=True)
        ratio = results["runs"][f"transformers/{dtype}"]["median_s"] / results["runs"][f"glm5/{dtype}"]["median_s"]
        results[f"speedup_{dtype}"] = ratio
        print(f"{'':>12} {dtype:>8}: glm5 is {ratio:.2f}x transformers' speed", flush=True)
    if len(args.dtypes) == 2:
        best = results["runs"]["glm5/bfloat16"]["tokens_per_s"] / results["runs"]["transformers/float32"]["tokens_per_s"]
        results["speedup_best_glm5_vs_transformers_fp32"] = best
        print(f"glm5 best (bf16) vs transformers fp32: {best:.2f}x")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
