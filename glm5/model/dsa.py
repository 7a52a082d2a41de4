"""DeepSeek Sparse Attention's main attention: each query attends, in absorbed MQA form over the
kv_lora_rank + rope wide latent, to the top-k tokens the lightning indexer chose (glm5.model.indexer holds the
indexer and its selection). Memory O(T * k): no T x T tensor for the main attention.

The model's two ways to use DSA (the `attn_impl` switch, see `glm5.model.mla`):
  reference  full T x T scores, the top-k applied as a mask (what transformers does; O(T^2) memory)
  sparse     indexer top-k per query (glm5.model.indexer.select_topk), then `sparse_latent_attention` below

Index conventions: `topk_indices` [B, S, k] int64 key positions; -1 marks an empty slot (a query with fewer
than k earlier tokens), the way FlashMLA pads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm5.kernels import latent_attention
from glm5.kernels.build import grad_wanted
from glm5.kernels.check import kernel_or_fallback, size_class
from glm5.model.indexer import block_budget

# Upper bound on the elements of one block of gathered latents [B, block, k, latent]: on the CPU 16 MB stays
# below glibc's 32 MB mmap threshold, so blocks reuse memory instead of page-faulting fresh pages (~8% of an
# 8K forward vs 64 MB); on a GPU blocks are larger (glm5.model.indexer.block_budget).
GATHER_BLOCK_ELEMENTS = 1 << 22


def sparse_latent_attention(
    q: torch.Tensor, kv: torch.Tensor, topk_indices: torch.Tensor, q_positions: torch.Tensor,
    scale: float, latent_dim: int, block: int | None = None, dropout_p: float = 0.0,
) -> torch.Tensor:
    """Absorbed-MQA attention of each query over its own top-k latents.

    q [B, S, H, L+R] (W_UK already folded into the nope part), kv [B, T, L+R] (normed latent | roped key),
    topk_indices [B, S, k] (-1 = empty), q_positions [B, S]. Returns the attention output in latent
    space [B, S, H, L]; the caller applies W_UV. Memory: O(block * k * (L+R)) per step.
    """
    B, S, H, D = q.shape
    T = kv.shape[1]
    K = topk_indices.shape[-1]
    if block is None:
        block = max(1, min(S, block_budget(GATHER_BLOCK_ELEMENTS, q.device) // max(1, B * K * D)))
        if not dropout_p and q.device.type == "cpu":
            # the C kernel (glm5.kernels; fp32, forward and backward; None otherwise): reads each selected row
            # where it lies instead of gathering copies; same softmax over the same rows. Where it beats this code.
            def kernel():
                visible = (topk_indices >= 0) & (topk_indices <= q_positions[..., None])
                offset = (torch.arange(B, device=kv.device) * T).view(B, 1, 1)
                rows = torch.where(visible, topk_indices + offset, -1)
                fast = latent_attention(q.reshape(B * S, H, D), kv.reshape(B * T, D), rows.view(B * S, K), scale,
                                        latent_dim, sequences=B)
                return None if fast is None else fast.view(B, S, H, latent_dim)

            shape_class = (size_class(B * S), H, D, latent_dim, size_class(K), grad_wanted(q, kv))
            return kernel_or_fallback("latent_attention", shape_class, kernel,
                                      lambda: sparse_latent_attention(q, kv, topk_indices, q_positions, scale,
                                                                      latent_dim, block))
    flat_kv = kv.reshape(B * T, D)
    batch_offset = (torch.arange(B, device=kv.device) * T).view(B, 1, 1)
    outputs = []
    for start in range(0, S, block):
        end = min(S, start + block)
        idx = topk_indices[:, start:end]  # [B, s, K]
        valid = (idx >= 0) & (idx <= q_positions[:, start:end, None])
        gathered = flat_kv.index_select(0, (idx.clamp(min=0) + batch_offset).reshape(-1)).view(B, end - start, K, D)
        # [B, s, H, D] @ [B, s, D, K] -> [B, s, H, K]
        scores = torch.matmul(q[:, start:end], gathered.transpose(-1, -2)).float() * scale
        scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0).to(q.dtype)  # a query with nothing visible (padding) -> 0
        if dropout_p:
            probs = F.dropout(probs, p=dropout_p)
        outputs.append(torch.matmul(probs, gathered[..., :latent_dim]))  # [B, s, H, L]
    if not outputs:  # no queries
        return q.new_zeros(B, 0, H, latent_dim)
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
