"""`make demo` until the training pipeline lands: build the nano preset, run a forward pass through both
attention paths, print the parameter table.

    glm5 demo [--preset nano] [--seq 256]
"""

from __future__ import annotations

import argparse
import time


def run(args: argparse.Namespace) -> int:
    import torch

    from glm5.config import GLM5Config
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.params import count_parameters

    torch.manual_seed(0)
    cfg = GLM5Config.from_preset(args.preset)
    print(f"[demo] building the {args.preset!r} preset: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.n_routed_experts} experts (top-{cfg.num_experts_per_tok}) + {cfg.n_shared_experts} shared, "
          f"MLA latent {cfg.kv_lora_rank}+{cfg.qk_rope_head_dim}, DSA top-{cfg.index_topk}, {cfg.num_nextn_predict_layers} MTP layer")
    model = GLM5ForCausalLM(cfg).eval()
    counts = count_parameters(cfg)
    for key in ("total_params", "mtp_params", "active_params", "active_params_excluding_embeddings"):
        print(f"  {key:<38} {counts[key]:>12,}")
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq))
    results = {}
    for impl in ("reference", "sparse"):
        model.set_attn_impl(impl)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(ids, return_mtp=True)
            dt = time.perf_counter() - t0
        results[impl] = out.logits
        print(f"[demo] forward ({impl:9s}) seq {args.seq}: logits {tuple(out.logits.shape)}, "
              f"MTP logits {tuple(out.mtp_logits[0].shape)}, {dt * 1000:.1f} ms")
    diff = (results["sparse"] - results["reference"]).abs().max().item()
    print(f"[demo] max |sparse - reference| = {diff:.2e} (DSA top-{cfg.index_topk} of {args.seq} tokens)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the main job on the embedded default (no arguments needed)")
    p.add_argument("--preset", default="nano", help="model preset (default nano)")
    p.add_argument("--seq", type=int, default=256, help="sequence length of the forward pass (default 256)")
    p.set_defaults(func=run)
