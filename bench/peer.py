"""What makes transformers' GlmMoeDsaForCausalLM comparable with glm5 in a benchmark's correctness check.

    from peer import lowest_position_topk
    with lowest_position_topk():          # untimed: transformers' DSA top-k under glm5's tie rule
        reference = twin(ids).logits
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def lowest_position_topk():
    """Within the block, Tensor.topk keeps the lowest positions among exact ties (a stable descending sort), the
    rule glm5 applies in every path. DSA's indexer scores tie exactly and often at random init (a key whose every
    head's ReLU term is 0 scores exactly 0; with tiny-bench's 4 indexer heads that is 1 key in 16), and stock
    torch.topk keeps an arbitrary subset of such ties, so transformers' outputs can only be compared with glm5's
    under the same rule. Slower than torch.topk: for checks, never inside a timed region."""
    original = torch.Tensor.topk

    def topk(self, k, dim=-1, largest=True, sorted=True):
        values, indices = torch.sort(self, dim=dim, descending=largest, stable=True)
        return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))

    torch.Tensor.topk = topk
    try:
        yield
    finally:
        torch.Tensor.topk = original
