"""The GLM-5 mixture of experts: sigmoid router with a selection-only bias, routed experts, one shared expert.

Router (as transformers and DeepSeek-V3 "noaux_tc"): s = sigmoid(x W^T) in fp32; experts are chosen by
s + e_score_correction_bias (group-limited when n_group > 1: a group scores by the sum of its 2 best biased
scores, only the best topk_group groups stay eligible); the combine weights are the unbiased s of the chosen
experts, normalized to sum 1 (norm_topk_prob) and times routed_scaling_factor.

The routed experts (`Experts`, fused [E, 2I, H] / [E, H, I] parameters) and every form they run in live in
`glm5.model.experts`, behind one dispatcher (`run_experts`) that this module and the engine both call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm5.config import GLM5Config
from glm5.model.experts import Experts
from glm5.model.layers import MLP, no_autograd


class Router(nn.Module):
    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.num_experts = cfg.n_routed_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, cfg.hidden_size, dtype=torch.float32))
        # Load balancing without an auxiliary loss: the trainer nudges this bias; it only affects selection.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # The router stays in fp32 whatever dtype the model is cast to (as in the released checkpoints).
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> scores [N, E] (sigmoid, fp32), weights [N, k] (fp32), indices [N, k]."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, groups]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1, sorted=False).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(self.num_experts // self.n_group, dim=1), float("-inf"))
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, weights * self.routed_scaling_factor, indices


class MoE(nn.Module):
    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        # The trainer turns this on to read each step's routing (expert load, scores for the aux loss).
        self.record_routing = False
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def routed(self, x: torch.Tensor, static: bool = False) -> torch.Tensor:
        """The router and the routed experts on x [N, hidden] -> [N, hidden] (no shared expert). `static`: no host
        sync (the engine's CUDA-graph steps); the path is chosen by `glm5.model.experts.experts_path`."""
        scores, weights, indices = self.gate(x)
        if self.record_routing:
            self.last_routing = (scores, indices)
        if isinstance(self.experts, Experts):
            return self.experts(x, indices, weights, static=static)
        return self.experts(x, indices, weights)  # a replacement with the same contract (FP8Experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        routed = self.routed(x.reshape(-1, shape[-1])).view(shape)
        shared = self.shared_experts(x)
        return routed.add_(shared) if no_autograd(routed, shared) else routed + shared
