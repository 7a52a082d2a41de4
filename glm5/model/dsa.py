"""DeepSeek Sparse Attention: the lightning indexer, top-k selection, and sparse MLA attention over the latent.

The indexer scores every earlier token s for query t:
    I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s]) * index_head_dim^-0.5,   w = weights_proj(x) * n_heads^-0.5
and each query attends only to its top-k tokens.

Two ways to use it (the model's `attn_impl` switch, see `glm5.model.mla`):
  reference  full T x T scores, the top-k applied as a mask (what transformers does; O(T^2) memory)
  sparse     indexer scored in blocks of queries, top-k latents gathered, attention in absorbed MQA form
             over the kv_lora_rank + rope wide latent: memory O(T * k), no T x T tensor for the main attention

Index conventions: `topk_indices` [B, S, k] int64 key positions; -1 marks an empty slot (a query with fewer
than k earlier tokens), the way FlashMLA pads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm5.config import GLM5Config
from glm5.kernels import indexer_topk, latent_attention
from glm5.kernels.build import grad_wanted
from glm5.kernels.check import kernel_or_fallback, size_class
from glm5.model.layers import apply_rope_interleaved

# Upper bounds on the elements of one block: indexer scores [B, block, heads, keys] and gathered latents
# [B, block, k, latent]. They bound memory at long T. On the CPU, small blocks stay in cache (8 MB of scores,
# 16 MB of gathered latents: below glibc's 32 MB mmap threshold, so blocks reuse memory instead of
# page-faulting fresh pages; ~8% of an 8K forward vs 16 / 64 MB); on a GPU, each block is a few kernel
# launches and a sync, so blocks are larger.
INDEXER_BLOCK_ELEMENTS = 1 << 21
GATHER_BLOCK_ELEMENTS = 1 << 22
MIN_INDEXER_BLOCK = 64
CUDA_BLOCK_ELEMENTS = 1 << 27


def _block_budget(cpu_budget: int, device: torch.device) -> int:
    return CUDA_BLOCK_ELEMENTS if device.type == "cuda" else cpu_budget


class Indexer(nn.Module):
    """The DSA lightning indexer: its own small projections, a shared 128-wide key per token."""

    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.index_topk = cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)  # kept in fp32, see model
        self.softmax_scale = self.head_dim**-0.5

    def _apply(self, fn, recurse=True):
        # weights_proj stays in fp32 whatever dtype the model is cast to (transformers keeps it so too).
        super()._apply(fn, recurse)
        if self.weights_proj.weight.dtype != torch.float32:
            self.weights_proj.weight.data = self.weights_proj.weight.data.float()
        return self

    def _rope_first(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # RoPE on the first rope_dim dims ([rope | pass]), interleaved pairs like the main attention
        rot, rest = x[..., : self.rope_dim], x[..., self.rope_dim :]
        return torch.cat([apply_rope_interleaved(rot, cos, sin), rest], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> k [B, T, head_dim] (what a decode cache stores per token)."""
        return self._rope_first(self.k_norm(self.wk(x)), cos, sin)

    def queries(
        self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> q [B, S, heads, head_dim], head weights w [B, S, heads] in fp32."""
        B, S, _ = q_resid.shape
        q = self.wq_b(q_resid).view(B, S, self.n_heads, self.head_dim)
        q = self._rope_first(q, cos, sin)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * (self.n_heads**-0.5)
        return q, w

    def scores(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Index scores in fp32: q [B, S, H, D], w [B, S, H], k [B, T, D] -> [B, S, T] (no mask applied)."""
        B, S, H, D = q.shape
        # relu(c * s) = c * relu(s) for c > 0: fold the 1/sqrt(D) scale into the head weights, saving a full
        # pass over the [S * H, T] block
        s = torch.matmul(q.float().reshape(B, S * H, D), k.float().transpose(1, 2))
        s = torch.relu_(s).view(B, S, H, -1)
        return torch.matmul((w * self.softmax_scale).unsqueeze(2), s).squeeze(2)


def causal_key_mask(
    q_positions: torch.Tensor, num_keys: int, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean [B or 1, S, T]: key s is visible to the query at position p when s <= p (and key_mask[s])."""
    keys = torch.arange(num_keys, device=q_positions.device)
    visible = keys.view(1, 1, -1) <= q_positions.view(q_positions.shape[0], -1, 1)
    if key_mask is not None:
        visible = visible & key_mask.bool().unsqueeze(1)
    return visible


def _tie_cut(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For a top-k (values [..., n]) of scores [..., T]: (keys above the k-th value, how many, keys equal to
    it, rows where more tie than fit, i.e. where the tie rule has work; never a row whose k-th is -inf)."""
    n = values.shape[-1]
    kth = values.amin(dim=-1, keepdim=True)
    greater = scores > kth
    above = greater.sum(dim=-1, keepdim=True)
    tied = scores == kth
    fix = (tied.sum(dim=-1, keepdim=True) > n - above) & (kth > float("-inf"))
    return greater, above, tied, fix


def _kept(greater: torch.Tensor, above: torch.Tensor, tied: torch.Tensor, n: int) -> torch.Tensor:
    """The keys the rule keeps: all above the k-th value, then the lowest-positioned ties up to n."""
    return greater | (tied & (tied.cumsum(dim=-1) <= n - above))


def lowest_position_ties(scores: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Make a top-k deterministic: among keys whose score equals a row's k-th largest, keep the lowest
    positions. scores [..., T], values / indices [..., n] from a top-k of it -> indices (a copy if changed).

    Exact ties are common in the indexer, not a measure-zero accident: a key whose dot products are negative
    in every head scores exactly 0, and a query whose head weights are mostly negative ranks those zeros
    highest. `torch.topk` keeps an arbitrary subset of them (it differs between lengths and devices), so
    every selection path here (this PyTorch code, the reference, the CPU kernel, the engine) applies this
    rule and they attend to the same keys. Rows whose k-th value is -inf (fewer visible keys than k) are
    left alone: their extra picks are invisible keys, masked later. (The engine's decode step first checks
    a top-(k+1): only when the (k+1)-th equals the k-th can a tie cross the cut.)
    """
    n = values.shape[-1]
    if n == 0:
        return indices
    greater, above, tied, fix = _tie_cut(scores, values)
    if not bool(fix.any()):
        return indices
    rows = fix.squeeze(-1).nonzero(as_tuple=True)
    keep = _kept(greater[rows], above[rows], tied[rows], n)
    indices = indices.clone()
    indices[rows] = keep.nonzero()[:, -1].view(-1, n).to(indices.dtype)
    return indices


def lowest_position_ties_static(scores: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`lowest_position_ties` without a host sync (no data-dependent branch or shape): the rule applied to every
    row and kept where a tie crosses the cut, so a CUDA graph can capture it. Same indices in the same order
    (ascending positions on rows it fixes, the top-k's own elsewhere)."""
    n = values.shape[-1]
    if n == 0:
        return indices
    greater, above, tied, fix = _tie_cut(scores, values)
    # kept positions first, in ascending order: a stable descending sort of the 0/1 mask
    fixed = _kept(greater, above, tied, n).to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :n]
    return torch.where(fix, fixed.to(indices.dtype), indices)


@torch.no_grad()
def select_topk_reference(
    indexer: Indexer, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k over the full masked score matrix, exactly as transformers does. -> [B, S, min(k, T)] int64.

    Like transformers, queries with fewer than k visible tokens get some masked (future) positions;
    attention masks those by causality. Exact ties at the k-th score keep the lowest positions
    (`lowest_position_ties`), where transformers keeps whichever `torch.topk` returns.
    """
    scores = indexer.scores(q, w, k)
    scores = scores.masked_fill(~causal_key_mask(q_positions, k.shape[1], key_mask), float("-inf"))
    values, indices = scores.topk(min(indexer.index_topk, scores.shape[-1]), dim=-1)
    return lowest_position_ties(scores, values, indices)


@torch.no_grad()
def select_topk_blockwise(
    indexer: Indexer, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor,
    key_mask: torch.Tensor | None = None, block: int | None = None,
) -> torch.Tensor:
    """Top-k per query, scoring one block of queries at a time so no [S, T] matrix exists at once.

    On a CPU (and `block` not given) the fused kernel `glm5.kernels.indexer_topk` does it when it can be
    built; this PyTorch code is its fallback (`GLM5_CPU_KERNELS=0`, `glm5.kernels.use_cpu_kernels(False)`).

    Each block only scores the keys up to its last query's position (causality). Slots that would
    hold an invisible (future or padded) key are set to -1. -> [B, S, topk] int64.
    """
    B, S, H, _ = q.shape
    T = k.shape[1]
    topk = indexer.index_topk
    if block is None:
        # at least MIN_INDEXER_BLOCK queries: at 32K tokens, 16-query blocks cost 13.4 s vs 11.9 s (per-block overhead)
        block = max(MIN_INDEXER_BLOCK, _block_budget(INDEXER_BLOCK_ELEMENTS, q.device) // max(1, B * H * T))
        block = min(S, block)
        if q.device.type == "cpu":
            # the fused C kernel (glm5.kernels, switch GLM5_CPU_KERNELS) where it can run and beats this code
            shape_class = (size_class(B * S), size_class(T), H, q.shape[-1], topk, key_mask is not None)
            return kernel_or_fallback(
                "indexer_topk", shape_class,
                lambda: indexer_topk(q, w * indexer.softmax_scale, k, q_positions, topk, key_mask),
                lambda: select_topk_blockwise(indexer, q, w, k, q_positions, key_mask, block))
    out = torch.full((B, S, topk), -1, dtype=torch.long, device=q.device)
    for start in range(0, S, block):
        end = min(S, start + block)
        pos = q_positions[:, start:end]
        kv_end = min(T, int(pos.max().item()) + 1)  # keys beyond the block's last position are all invisible
        if kv_end <= 0:  # every query of the block before position 0 (padding): nothing visible, slots stay -1
            continue
        scores = indexer.scores(q[:, start:end], w[:, start:end], k[:, :kv_end])
        if key_mask is None:
            # keys before the block's first position are visible to all its queries: mask only the rest
            first = min(kv_end, int(pos.min().item()) + 1)
            later = torch.arange(first, kv_end, device=pos.device)  # only these keys can be in some query's future
            scores[:, :, first:].masked_fill_(later.view(1, 1, -1) > pos.unsqueeze(-1), float("-inf"))
        else:
            scores = scores.masked_fill(~causal_key_mask(pos, kv_end, key_mask[:, :kv_end]), float("-inf"))
        n = min(topk, kv_end)
        values, idx = topk_grouped(scores, n)
        # the tie rule leaves rows with a -inf k-th value alone, so `values` still marks their empty slots
        idx = lowest_position_ties(scores, values, idx)
        out[:, start:end, :n] = idx.masked_fill(values == float("-inf"), -1)
    return out


def topk_grouped(scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest of each row of scores [..., T] (values, indices; unsorted), about 2x faster than
    `torch.topk` on a CPU once T >= 16 n.

    Split each row into G interleaved groups (group g = positions g, g + G, g + 2G, ...). Every one of the n
    largest values lies in a group whose maximum is at least the n-th largest value, and at most n groups
    have such a maximum, so the answer is inside the n groups with the largest maxima: a vectorized max over
    the groups, a top-k over G maxima, a top-k over n * T / G candidates, instead of one top-k over T.
    The values are exactly torch.topk's; among equal values the positions kept may differ (as between any
    two top-k implementations)."""
    T = scores.shape[-1]
    per_group = min(16, T // (8 * n)) if n > 0 else 0  # G >= 8 n groups; more members per group costs more
    if per_group < 2:
        return scores.topk(n, dim=-1, sorted=False)
    pad = (-T) % per_group
    if pad:
        scores = F.pad(scores, (0, pad), value=float("-inf"))
    groups = scores.shape[-1] // per_group
    lead = scores.shape[:-1]
    best = scores.view(*lead, per_group, groups).amax(dim=-2).topk(n, dim=-1, sorted=False).indices  # [..., n]
    members = torch.arange(per_group, device=scores.device) * groups
    candidates = (best.unsqueeze(-1) + members).view(*lead, n * per_group)
    values, pick = scores.gather(-1, candidates).topk(n, dim=-1, sorted=False)
    return values, candidates.gather(-1, pick)


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
        block = max(1, min(S, _block_budget(GATHER_BLOCK_ELEMENTS, q.device) // max(1, B * K * D)))
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
