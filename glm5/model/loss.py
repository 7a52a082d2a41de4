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


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> summed CE of the chunk, the log-sum-exp per row."""
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return ((lse - picked) * valid).sum(), lse


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, count_correct, chunk):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for a in range(0, hidden.shape[0], chunk):
            h, t = hidden[a : a + chunk], targets[a : a + chunk]
            valid = t != IGNORE_INDEX
            logits = h @ weight.t()
            if count_correct:
                correct += ((logits.argmax(dim=-1) == t) & valid).sum()
            logp = torch.log_softmax(logits, dim=-1)  # one fused pass; logits is free after it
            del logits
            picked = logp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total -= (picked * valid).sum()
            # d(sum CE)/d logits = softmax - one_hot(target), zero for rows without a target; in place
            grad = logp.exp_()
            grad.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -valid.to(grad.dtype).unsqueeze(1))
            if not bool(valid.all()):
                grad[~valid] = 0.0
            if want_h:
                torch.mm(grad, weight, out=grad_h[a : a + chunk])
            if want_w:
                grad_w.addmm_(grad.t(), h)
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
    if fused and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total, correct = _LinearCrossEntropy.apply(hidden, weight, targets, count_correct, chunk)
        return total, int(correct)
    if fused:  # no gradient wanted: the same chunks, no gradient work
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = 0
        for a in range(0, hidden.shape[0], chunk):
            t = targets[a : a + chunk]
            logits = hidden[a : a + chunk] @ weight.t()
            valid = t != IGNORE_INDEX
            total += _chunk_loss(logits, t, valid)[0]
            if count_correct:
                correct += int(((logits.argmax(dim=-1) == t) & valid).sum())
        return total, correct
    logits = F.linear(hidden, weight).float()
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = int(((logits.argmax(dim=-1) == targets) & (targets != IGNORE_INDEX)).sum()) if count_correct else 0
    return total, correct
