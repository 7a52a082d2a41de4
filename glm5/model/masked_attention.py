"""Masked latent attention for training lengths: MQA over the 576-wide latent, blocked over queries.

    out = masked_latent_attention(q, kv, allowed, scale, latent_dim)   # q [B, S, H, D], kv [B, T, D]

Every head reads the same latent keys and values (absorbed MLA is multi-query attention), so the heads are
folded into the query axis: one [B, S*H, D] x [B, D, T] matmul per query block instead of a per-head copy of
the latent. Query blocks stop at the last key any of their rows may see, which skips most of the causal upper
triangle. The backward is written out (the flash-attention identity dS = P * (dP - rowsum(dO * O))), so no
per-head copy of the keys and no generic bool-mask softmax machinery run in it either. Rows with no allowed key
give 0, as `torch.nan_to_num` after SDPA does.

This is the CPU-friendly way to train DSA's top-k attention at a few hundred tokens (the top-k as a mask, see
`MLAttention.sparse_as_mask`); equal to `F.scaled_dot_product_attention` within float rounding
(tests/test_masked_attention.py).
"""

from __future__ import annotations

import torch

# queries per block; smaller skips more of the causal triangle, larger runs fewer, bigger matmuls
QUERY_BLOCK = 128


def _blocks(allowed: torch.Tensor, block: int, key_ends: torch.Tensor | None = None):
    """Yield (start, end, key_end) per query block: key_end = 1 + the last key column any row may see (or, from
    `key_ends` [S], an upper bound on it per query, e.g. its position + 1, which saves a pass over the mask)."""
    S, T = allowed.shape[1], allowed.shape[2]
    if key_ends is not None:
        bounds = key_ends.clamp(0, T).tolist()
        for start in range(0, S, block):
            end = min(start + block, S)
            yield start, end, max(bounds[start:end])
        return
    seen = allowed.any(dim=0)  # [S, T]
    for start in range(0, S, block):
        end = min(start + block, S)
        cols = seen[start:end].any(dim=0).nonzero()
        key_end = int(cols.max()) + 1 if cols.numel() else 0
        yield start, end, key_end


class _MaskedLatentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, allowed, scale: float, latent_dim: int, block: int, key_ends):
        B, S, H, D = q.shape
        out = q.new_zeros(B, S, H, latent_dim)
        acc = torch.promote_types(q.dtype, torch.float32)  # scores and softmax: fp32, or fp64 for fp64 inputs
        probs, spans = [], []
        for start, end, key_end in _blocks(allowed, block, key_ends):
            spans.append((start, end, key_end))
            if key_end == 0:
                probs.append(None)
                continue
            n = end - start
            keys = kv[:, :key_end]
            # scores and softmax in fp32 whatever the matmul dtype (a no-op in fp32)
            s = torch.bmm(q[:, start:end].reshape(B, n * H, D), keys.transpose(1, 2)).to(acc).mul_(scale)
            s = s.view(B, n, H, key_end)
            block_mask = allowed[:, start:end, :key_end]
            s.masked_fill_(~block_mask.unsqueeze(2), float("-inf"))
            p = torch.softmax(s, dim=-1)
            empty = ~block_mask.any(dim=-1)  # [B, n]
            if bool(empty.any()):
                p.masked_fill_(empty[:, :, None, None], 0.0)
            p = p.view(B, n * H, key_end).to(q.dtype)
            out[:, start:end] = torch.bmm(p, keys[..., :latent_dim]).view(B, n, H, latent_dim)
            probs.append(p)
        ctx.save_for_backward(q, kv, out, *[p for p in probs if p is not None])
        ctx.spans, ctx.has_probs = spans, [p is not None for p in probs]
        ctx.scale, ctx.latent_dim = scale, latent_dim
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, kv, out, *saved = ctx.saved_tensors
        B, S, H, D = q.shape
        L = ctx.latent_dim
        grad_out = grad_out.to(q.dtype).contiguous()
        grad_q, grad_kv = torch.zeros_like(q), torch.zeros_like(kv)
        acc = torch.promote_types(q.dtype, torch.float32)
        delta = (grad_out.to(acc) * out.to(acc)).sum(dim=-1)  # [B, S, H]: rowsum(dO * O) = rowsum(dP * P)
        saved_iter = iter(saved)
        for (start, end, key_end), has_p in zip(ctx.spans, ctx.has_probs):
            if not has_p:
                continue
            p = next(saved_iter)  # [B, n*H, key_end]
            n = end - start
            keys = kv[:, :key_end]
            d_o = grad_out[:, start:end].reshape(B, n * H, L)
            grad_kv[:, :key_end, :L] += torch.bmm(p.transpose(1, 2), d_o)
            d_s = torch.bmm(d_o, keys[..., :L].transpose(1, 2)).to(acc)  # dP
            d_s = d_s.sub_(delta[:, start:end].reshape(B, n * H, 1)).mul_(p).mul_(ctx.scale).to(q.dtype)
            grad_q[:, start:end] = torch.bmm(d_s, keys).view(B, n, H, D)
            grad_kv[:, :key_end] += torch.bmm(d_s.transpose(1, 2), q[:, start:end].reshape(B, n * H, D))
        return grad_q, grad_kv, None, None, None, None, None


def masked_latent_attention(
    q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor, scale: float, latent_dim: int, block: int = QUERY_BLOCK,
    key_ends: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, S, H, D], kv [B, T, D] (values are kv[..., :latent_dim]), allowed [B, S, T] bool -> [B, S, H, latent_dim].

    key_ends [S] (optional): per query, an upper bound on 1 + its last allowed key (its position + 1 when causal)."""
    if allowed.dtype != torch.bool or allowed.shape != (q.shape[0], q.shape[1], kv.shape[1]):
        raise ValueError(f"allowed must be a bool [B, S, T] = {(q.shape[0], q.shape[1], kv.shape[1])}, got "
                         f"{allowed.dtype} {tuple(allowed.shape)}")
    device = q.device.type
    # under autocast run in its dtype, with autocast off inside (the backward must see the forward's dtypes)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.promote_types(q.dtype, kv.dtype)
    with torch.autocast(device, enabled=False):
        return _MaskedLatentAttention.apply(q.to(dtype).contiguous(), kv.to(dtype).contiguous(), allowed, scale,
                                            latent_dim, block, key_ends)
