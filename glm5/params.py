"""Parameter counts of a GLM-5 config, from the real module tree built on the meta device (no memory used).

    glm5 params glm5-744b            # a table
    glm5 params glm5-744b --json     # {"total_params": ..., "mtp_params": ..., "active_params": ..., ...}

Every tensor a checkpoint holds is counted (`checkpoint_tensors`): the parameters and the routers'
`e_score_correction_bias` buffers; `glm5 plan` counts from the same function.

total_params      the main model (embedding, layers, final norm, lm_head), MTP excluded
mtp_params        the MTP module's own weights (its embedding and output head are the main model's)
active_params     what one token touches in the main model: every weight except the routed experts it is
                  not sent to (num_experts_per_tok of n_routed_experts per MoE layer); includes the input
                  embedding and lm_head
active_params_excluding_embeddings   the same without the input embedding table (one row is read per token)
"""

from __future__ import annotations

import argparse
import json
import math

from glm5.config import PRESETS, GLM5Config


def checkpoint_tensors(cfg: GLM5Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of `cfg` holds: the parameters and the persistent buffers (the
    routers' `e_score_correction_bias`, learned by the trainer's bias update and saved with the weights), from
    the model built on the meta device; a tied lm_head is listed once, as the embedding. The one count that
    `glm5 params` and `glm5 plan` (glm5.quant.plan) both read."""
    import torch

    from glm5.model.transformer import GLM5ForCausalLM

    with torch.device("meta"):
        model = GLM5ForCausalLM(cfg)
    seen: set[int] = set()
    shapes = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # tied weights: one tensor under two names
            seen.add(id(tensor))
            shapes[name] = tuple(tensor.shape)
    return shapes


def count_parameters(cfg: GLM5Config) -> dict[str, int]:
    numel = {name: math.prod(shape) for name, shape in checkpoint_tensors(cfg).items()}
    mtp = sum(n for k, n in numel.items() if k.startswith("mtp."))
    total = sum(numel.values()) - mtp
    embedding = numel["model.embed_tokens.weight"]
    lm_head = 0 if cfg.tie_word_embeddings else numel["lm_head.weight"]
    routed = sum(n for k, n in numel.items() if ".mlp.experts." in k and not k.startswith("mtp."))
    moe_layers = sum(1 for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    idle_fraction = 1 - cfg.num_experts_per_tok / cfg.n_routed_experts
    active = total - round(routed * idle_fraction)
    return {
        "total_params": total,
        "mtp_params": mtp,
        "active_params": active,
        "active_params_excluding_embeddings": active - embedding,
        "embedding_params": embedding,
        "lm_head_params": lm_head,
        "routed_expert_params": routed,
        "routed_expert_params_per_layer": routed // moe_layers if moe_layers else 0,
        "moe_layers": moe_layers,
        "checkpoint_params": total + mtp,
    }


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def run(args: argparse.Namespace) -> int:
    cfg = GLM5Config.from_pretrained(args.config) if args.config else GLM5Config.from_preset(args.preset)
    counts = count_parameters(cfg)
    if args.json:
        print(json.dumps(counts))
        return 0
    print(f"parameters of {args.config or args.preset} (built on the meta device)")
    for key, value in counts.items():
        print(f"  {key:<38} {value:>18,}  {_human(value) if 'layers' not in key else ''}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("params", help="count total / MTP / active parameters of a preset or config.json")
    p.add_argument("preset", nargs="?", default="nano", help=f"preset name: {', '.join(PRESETS)} (default nano)")
    p.add_argument("--config", help="a config.json (or a checkpoint directory) instead of a preset")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)
