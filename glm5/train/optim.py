"""Optimizers and learning-rate schedules: AdamW, Muon (+ AdamW for the rest), warm-up + cosine or WSD.

    from glm5.train.optim import build_optimizer, lr_factor
    opt = build_optimizer(model, "muon", lr=3e-3, muon_lr=0.02, weight_decay=0.0)
    for group in opt.param_groups: group["lr"] = group["base_lr"] * lr_factor(step, total, "cosine", warmup)

Muon (Jordan et al. 2024, as nanochat uses it) orthogonalizes each weight matrix's momentum with five
Newton-Schulz iterations: every direction of the update gets the same size, which trains hidden matrices
faster than Adam at the same step count. It suits hidden matrices only: embeddings, the LM head, norms,
router weights and biases go to AdamW. The fused expert weights [E, out, in] are E matrices; Muon treats
them as a batch. Computed in fp32 so a CPU run is bitwise reproducible.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from glm5.train.config import OPTIMIZERS, SCHEDULES


def lr_factor(step: int, total_steps: int, schedule: str = "cosine", warmup: int = 0,
              min_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Multiplier of the base learning rate at `step` (0-based).

    Linear warm-up over `warmup` steps, then: "cosine" down to min_ratio at the last step; "wsd" (warm-up,
    stable, decay) flat until the last decay_fraction of the steps, then linear down to min_ratio;
    "constant" flat.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: must be one of {SCHEDULES}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total_steps <= warmup + 1:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = 1.0 - decay_fraction
    if progress <= decay_start:
        return 1.0
    return 1.0 - (1.0 - min_ratio) * (progress - decay_start) / decay_fraction


def newton_schulz(grad: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of the SVD of each matrix in `grad` [..., m, n] (the quintic iteration of Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = grad.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the wide side: X X^T is the smaller product
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalized per matrix; scaled by sqrt(max(1, out/in))
    so that tall and wide matrices move alike. Decoupled weight decay as in AdamW."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() < 2:
                    raise ValueError(f"Muon takes matrices only, got a parameter of shape {tuple(p.shape)}")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                buf = state["momentum_buffer"]
                grad = p.grad.float()
                buf.mul_(group["momentum"]).add_(grad)
                update = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_steps"])
                update *= max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return None


class CombinedOptimizer:
    """Several optimizers stepped as one (Muon for matrices, AdamW for the rest); one state_dict."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("optimizers", [])) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state does not match this optimizer (AdamW vs Muon?)")
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)


def is_muon_param(name: str, p: nn.Parameter) -> bool:
    """Hidden weight matrices: 2-D (or 3-D fused experts), not the embedding, LM head or router."""
    return p.dim() >= 2 and not any(part in name for part in ("embed_tokens", "lm_head", "gate.weight"))


def adamw_kernel(named: list[tuple[str, torch.Tensor]]) -> dict:
    """AdamW's implementation: the fused kernel (one pass over each tensor's p, grad, m, v) where torch has it
    for these parameters (plain tensors on cpu or cuda), else the per-parameter loop (foreach=False). Both are
    elementwise, so the result does not depend on how parameters are grouped, and each is deterministic (a
    resumed run repeats an uninterrupted one bitwise); they differ from each other by float rounding (~1e-6
    after 20 steps). Fused: the tiny-bench AdamW update 27 -> 8 ms on 2 CPU threads (dev/LOG.md)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        DTensor = ()  # noqa: N806
    fused = all(p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for _, p in named)
    return {"fused": True} if fused else {"foreach": False}


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 3e-3, muon_lr: float = 0.02,
                    weight_decay: float = 0.0, betas=(0.9, 0.95)) -> CombinedOptimizer:
    """Only parameters with requires_grad are optimized (a DSA warm-up freezes all but the indexer).
    Every group records its `base_lr`, which the schedule scales."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}: must be one of {OPTIMIZERS}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters")
    optimizers: list[torch.optim.Optimizer] = []
    if name == "muon":
        matrices = [p for n, p in named if is_muon_param(n, p)]
        named = [(n, p) for n, p in named if not is_muon_param(n, p)]
        if matrices:
            optimizers.append(Muon(matrices, lr=muon_lr, weight_decay=weight_decay))
    # no weight decay on norms and biases (1-D)
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    if groups:
        optimizers.append(torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **adamw_kernel(named)))
    combined = CombinedOptimizer(optimizers)
    for group in combined.param_groups:
        group["base_lr"] = group["lr"]
    return combined
