"""Summed next-token cross-entropies straight from hidden states, without a [tokens, vocab] logits tensor.

    total, correct = linear_cross_entropy(hidden, lm_head.weight, targets)   # targets [N], -100 = none

`GLM5ForCausalLM.forward(ids, targets=labels)` uses it for the LM head and every MTP depth (fp32 without
autocast; otherwise it computes logits and `F.cross_entropy`). Rows go through in chunks: the chunk's logits,
their log-sum-exp and loss, then, still in cache, the softmax minus the one-hot target turned into the
chunk's gradients for the hidden states and the weight. The backward only scales those by the incoming
gradient. At 4,096 x 4,096 fp32 logits this skips a 64 MB logits tensor, its log-softmax, the log-softmax's
backward and a zero-filled 64 MB gradient: ~20 ms of a 640 ms CPU training step (dev/LOG.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ROWS = 1024


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] -> targets [B, T]: position t predicts labels[t + 1], the last position nothing. Shifting the
    labels, not the logits: slicing [B, T, V] logits would copy them, and the slice's backward would zero-fill
    a second full-size gradient."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, count_correct: bool = False) -> tuple[torch.Tensor, int]:
    """From logits [..., V] and targets [...] (-100 = none): the summed CE in fp32, and (count_correct) how many
    rows' argmax is their target."""
    logits, targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = int(((logits.argmax(dim=-1) == targets) & (targets != IGNORE_INDEX)).sum()) if count_correct else 0
    return total, correct


def _chunked(hidden, weight, targets, count_correct, chunk, grad_h=None, grad_w=None):
    """The chunk loop of `linear_cross_entropy` -> (summed CE, correct count) as tensors. With grad_h / grad_w
    ([N, H] to fill, [V, H] zeros to add into) each chunk's gradients too, from its log-softmax; without them,
    only a log-sum-exp per row (no [chunk, V] output)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for a in range(0, hidden.shape[0], chunk):
        h, t = hidden[a : a + chunk], targets[a : a + chunk]
        valid = t != IGNORE_INDEX
        picked_at = t.clamp(min=0).unsqueeze(1)
        logits = h @ weight.t()
        if count_correct:
            correct += ((logits.argmax(dim=-1) == t) & valid).sum()
        if grad_h is None and grad_w is None:
            total += ((torch.logsumexp(logits, dim=-1) - logits.gather(1, picked_at).squeeze(1)) * valid).sum()
            continue
        logp = torch.log_softmax(logits, dim=-1)  # one fused pass; logits is free after it
        del logits
        total -= (logp.gather(1, picked_at).squeeze(1) * valid).sum()
        # d(sum CE)/d logits = softmax - one_hot(target), zero for rows without a target; in place
        grad = logp.exp_()
        grad.scatter_add_(1, picked_at, -valid.to(grad.dtype).unsqueeze(1))
        if not bool(valid.all()):
            grad[~valid] = 0.0
        if grad_h is not None:
            torch.mm(grad, weight, out=grad_h[a : a + chunk])
        if grad_w is not None:
            grad_w.addmm_(grad.t(), h)
    return total, correct


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, count_correct, chunk):
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total, correct = _chunked(hidden, weight, targets, count_correct, chunk, grad_h, grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_total, None if grad_w is None else grad_w * grad_total,
                None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, count_correct: bool = False,
    chunk: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, int]:
    """sum over rows of CE(hidden @ weight.T, targets) in fp32 (rows with target -100 count nothing), and how
    many rows' argmax hits their target (when count_correct). hidden [N, H], weight [V, H], targets [N].

    fp32 without autocast: chunked, fused as the module docstring says. Otherwise (bf16, autocast) the
    plain logits and `F.cross_entropy`, which is what autocast's dtype rules expect."""
    fused = (hidden.dtype == torch.float32 and weight.dtype == torch.float32
             and not torch.is_autocast_enabled(hidden.device.type))
    if not fused:
        return cross_entropy_sum(F.linear(hidden, weight), targets, count_correct)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total, correct = _LinearCrossEntropy.apply(hidden, weight, targets, count_correct, chunk)
    else:  # no gradient wanted: the same chunks, no gradient work
        total, correct = _chunked(hidden, weight, targets, count_correct, chunk)
    return total, int(correct)
