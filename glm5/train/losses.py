"""The training losses: next-token LM, multi-token prediction (MTP), the MoE sequence-wise balance loss,
and the DSA indexer KL (read from the attention layers, which compute it under their training switch).

    lm_sum, n = lm_loss_sum(out.logits, labels)          # summed, so the caller can divide by the step's targets
    mtp, acc = mtp_loss(out.mtp_logits, labels)          # mean over depths; accuracy of the depth-1 head
    aux = sequence_balance_loss(moe_modules(model), batch_size)
    kl = indexer_kl(model)                               # sum over layers of each layer's mean KL
"""

from __future__ import annotations

import torch
from torch import nn

from glm5.model.loss import IGNORE_INDEX, cross_entropy_sum, next_token_targets
from glm5.model.mla import MLAttention
from glm5.model.moe import MoE


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies (position t predicts labels[t + 1]) in fp32, and how many targets.
    (The trainer's own step gets the same sum without logits: `model(ids, targets=labels).lm_loss_sum`.)"""
    targets = next_token_targets(labels)
    return cross_entropy_sum(logits, targets)[0], int((targets != IGNORE_INDEX).sum())


def mtp_loss(mtp_logits: list[torch.Tensor] | None, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean over MTP depths d of the cross-entropy of predicting token t + 1 + d at position t (depths with no
    target skipped), and the depth-1 head's top-1 accuracy (what speculative decoding's acceptance rate follows)."""
    sums, correct, counted = mtp_loss_sums(mtp_logits, labels)
    means = [s / n for d, s in enumerate(sums, start=1) if (n := int((labels[:, 1 + d :] != IGNORE_INDEX).sum()))]
    if not means:
        return labels.new_zeros((), dtype=torch.float32), 0.0
    return torch.stack(means).mean(), correct / counted if counted else 0.0


def mtp_loss_sums(mtp_logits: list[torch.Tensor] | None, labels: torch.Tensor) -> tuple[list[torch.Tensor], int, int]:
    """Per MTP depth d, the summed cross-entropy of predicting token t + 1 + d at position t (the trainer divides
    each by the step's global target count of that depth, as for the LM loss, so micro-batches and processes of
    unequal target counts add up to one batch's mean), and the depth-1 head's (correct, counted) predictions."""
    sums, correct, counted = [], 0, 0
    for depth, logits in enumerate(mtp_logits or [], start=1):
        usable = labels.shape[1] - 1 - depth
        if usable < 1:
            break
        target = labels[:, 1 + depth :]
        total, hits = cross_entropy_sum(logits[:, :usable], target, count_correct=depth == 1)
        sums.append(total)
        if depth == 1:
            correct, counted = hits, int((target != IGNORE_INDEX).sum())
    return sums, correct, counted


def moe_modules(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def attention_modules(model: nn.Module) -> list[MLAttention]:
    return [m for m in model.modules() if isinstance(m, MLAttention)]


def sequence_balance_loss(moes: list[MoE], batch_size: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise auxiliary loss, summed over MoE layers (multiply by its small alpha):

        L = sum_i f_i * P_i per sequence, f_i = E / (k T) * #tokens routed to i, P_i = mean_t s_i,t / sum_j s_j,t

    It only discourages extreme imbalance inside one sequence; the bias update does the main balancing.
    Needs `record_routing` on (the forward then keeps each layer's scores and choices)."""
    total = None
    for moe in moes:
        if moe.last_routing is None:
            continue
        scores, chosen = moe.last_routing  # [N, E] sigmoid, [N, k]
        num_experts, k = scores.shape[-1], chosen.shape[-1]
        scores = scores.view(batch_size, -1, num_experts)
        chosen = chosen.view(batch_size, -1, k)
        tokens = scores.shape[1]
        counts = torch.zeros(batch_size, num_experts, device=scores.device).scatter_add_(
            1, chosen.reshape(batch_size, -1), torch.ones(batch_size, tokens * k, device=scores.device))
        fraction = counts * num_experts / (k * tokens)  # [B, E], no gradient (a count)
        probability = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
        loss = (fraction * probability).sum(-1).mean()
        total = loss if total is None else total + loss
    return total if total is not None else torch.zeros(())


def indexer_kl(model: nn.Module) -> torch.Tensor | None:
    """Sum over attention layers of the indexer KL each stored in this forward (None if none did)."""
    values = [m.indexer_kl for m in attention_modules(model) if m.indexer_kl is not None]
    for m in attention_modules(model):
        m.indexer_kl = None  # consumed: a later forward without the switch must not see a stale value
    return torch.stack(values).sum() if values else None
