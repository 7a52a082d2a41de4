"""Auxiliary-loss-free MoE load balancing (DeepSeek-V3, GLM-5): after each step, every MoE layer's router bias
moves toward the experts that got fewer tokens than average and away from the busy ones.

    loads = expert_loads(moes)             # per layer: tokens routed to each expert in this forward
    update_router_bias(moes, step_loads, speed=1e-3)
    imbalance(load)                        # max load / mean load: 1.0 is perfectly balanced

The bias only affects which experts are chosen, not the combine weights, so it steers load without a
gradient that fights the LM loss. Loads are summed over micro-batches and (under torchrun) over processes
before the update, so every process applies the same change and one process matches many.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from glm5.model.moe import MoE


def expert_loads(moes: list[MoE], keep: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Tokens per expert [E] (float) of each layer's last forward (needs `record_routing`). keep [B, T] bool: only
    those positions count (False on a padded row's padding); the MTP layer routes the first T - d of them."""
    loads = []
    for moe in moes:
        if moe.last_routing is None:  # a layer this forward did not run (the MTP layer with --mtp-weight 0)
            loads.append(torch.zeros(moe.gate.num_experts, device=moe.gate.e_score_correction_bias.device))
            continue
        _, chosen = moe.last_routing
        if keep is not None:
            positions = chosen.shape[0] // keep.shape[0]
            chosen = chosen[keep[:, :positions].reshape(-1)]
        loads.append(torch.bincount(chosen.reshape(-1), minlength=moe.gate.num_experts).float())
    return loads


def all_reduce_loads(loads: list[torch.Tensor]) -> list[torch.Tensor]:
    if dist.is_available() and dist.is_initialized() and loads:
        flat = torch.stack(loads)
        dist.all_reduce(flat)
        return list(flat.unbind(0))
    return loads


@torch.no_grad()
def update_router_bias(moes: list[MoE], loads: list[torch.Tensor], speed: float) -> None:
    """bias_i += speed * sign(mean load - load_i): underloaded experts up, overloaded down."""
    for moe, load in zip(moes, loads):
        bias = moe.gate.e_score_correction_bias
        bias.add_(torch.sign(load.mean() - load).to(bias), alpha=speed)


def imbalance(load: torch.Tensor) -> float:
    """max / mean tokens per expert (1.0 = balanced; E / k means every token went to the same experts)."""
    mean = float(load.mean())
    return float(load.max()) / mean if mean > 0 else 0.0
