"""The DSA lightning indexer: its projections, its scores, and the top-k selection in every form, behind one
dispatcher that the model (glm5.model.mla) and the engine (glm5.engine.runner) both call.

The indexer scores every earlier token s for query t:
    I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s]) * index_head_dim^-0.5,   w = weights_proj(x) * n_heads^-0.5
and each query keeps its top-k tokens (DeepSeek-V3.2's DSA). `index_scores` is that sum, with every scale
folded into w beforehand (relu(c s) = c relu(s) for c > 0), the one place it is written.

    from glm5.model.indexer import select_topk
    topk = select_topk(q, w, k, index_topk, q_positions=pos)                  # the model: [B, S, index_topk]
    topk = select_topk(q, w, keys, index_topk, visible=visible, static=True)  # the engine over its cache

Selection paths (`select_path` picks one; any can be named with `path=`):

  path           runs when                                            how
  kernel         model, CPU, kernels built (GLM5_CPU_KERNELS)         `glm5.kernels.indexer_topk`: scores and top-k
                                                                      fused in C, per query row, never [S, T]
  blockwise      model otherwise (and the kernel's fallback)          blocks of queries, each scored only up to its
                                                                      last position, `topk_grouped`
  reference      model, attn_impl "reference" (only by name)          the full [S, T] matrix and torch.topk, as
                                                                      transformers (no -1 slots: see its docstring)
  cached         engine step (keys read from the latent cache,        one [S, Q, T] block; a top-(k+1) says whether
                 a visibility mask [S, Q, T] instead of positions)    a tie crosses the cut (only then the rule runs)
  cached_static  engine step with StepInputs.static (CUDA graphs)     the tie rule on every row, no host sync

Every path keeps each query's top-k with one rule for exact ties at the k-th score: the lowest positions
(`lowest_position_ties`); slots with no visible key hold -1, the way FlashMLA pads (`reference` excepted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm5.config import GLM5Config
from glm5.kernels import indexer_topk
from glm5.kernels.check import kernel_or_fallback, size_class
from glm5.model.layers import apply_rope_interleaved

# Upper bound on the elements of one block of indexer scores [B, block, heads, keys] (it bounds memory at long
# T). On the CPU a small block stays in cache (8 MB: below glibc's 32 MB mmap threshold, so blocks reuse memory
# instead of page-faulting fresh pages); on a GPU each block is a few kernel launches and a sync, so blocks
# are larger.
INDEXER_BLOCK_ELEMENTS = 1 << 21
MIN_INDEXER_BLOCK = 64
CUDA_BLOCK_ELEMENTS = 1 << 27

SELECT_PATHS = ("kernel", "blockwise", "reference", "cached", "cached_static")


def block_budget(cpu_budget: int, device: torch.device) -> int:
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
        """Index scores in fp32: q [B, S, H, D], w [B, S, H] (from `queries`), k [B, T, D] -> [B, S, T] (no mask)."""
        return index_scores(q, w * self.softmax_scale, k)


def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The indexer's scores in fp32: q [B, S, H, D], w [B, S, H] head weights with every scale folded in,
    k [B, T, D] -> [B, S, T] (no mask applied)."""
    B, S, H, D = q.shape
    # the scale is in w, saving a full pass over the [S * H, T] block
    s = torch.matmul(q.float().reshape(B, S * H, D), k.float().transpose(1, 2))
    s = torch.relu_(s).view(B, S, H, -1)
    return torch.matmul(w.float().unsqueeze(2), s).squeeze(2)


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
    # kept positions in ascending order: each kept key goes to slot (keys kept before it), the others to a
    # spare slot n that is dropped (a rank and a scatter: linear in T, where a stable sort of the mask is not)
    kept = _kept(greater, above, tied, n)
    rank = kept.cumsum(dim=-1) - 1
    slot = torch.where(kept & (rank < n), rank, n)
    positions = torch.arange(scores.shape[-1], device=scores.device, dtype=indices.dtype).expand_as(slot)
    fixed = indices.new_zeros(*indices.shape[:-1], n + 1).scatter_(-1, slot, positions)[..., :n]
    return torch.where(fix, fixed, indices)


def select_path(q: torch.Tensor, visible: torch.Tensor | None = None, static: bool = False) -> str:
    """The path `select_topk` takes (the table in the module docstring)."""
    if visible is not None:
        return "cached_static" if static else "cached"
    return "kernel" if q.device.type == "cpu" else "blockwise"


def select_topk(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, topk: int, *, q_positions: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None, visible: torch.Tensor | None = None, static: bool = False,
    path: str | None = None,
) -> torch.Tensor:
    """Each query's top-k keys by index score. q [B, S, H, D], w [B, S, H] (every scale folded in), k [B, T, D].

    The model gives `q_positions` [B or 1, S] (and a `key_mask` [B, T]): key t is visible to a query at
    position p when t <= p -> [B, S, topk]. The engine gives `visible` [B, S, T] over its cached keys (and
    `static` for a CUDA-graph step) -> [B, S, min(topk, T)]. Empty slots hold -1."""
    path = path or select_path(q, visible, static)
    if path in ("cached", "cached_static"):
        if visible is None:
            raise ValueError(f"select_topk path {path!r} needs `visible`")
        return select_topk_cached(q, w, k, topk, visible, static=path == "cached_static")
    if q_positions is None:
        raise ValueError(f"select_topk path {path!r} needs `q_positions`")
    if path == "kernel":
        # the C kernel where it can run (None: not a CPU, kernels off, no compiler) and beats the blockwise
        # PyTorch code on this machine for this shape class (glm5.kernels.check)
        B, S, H, D = q.shape
        shape_class = (size_class(B * S), size_class(k.shape[1]), H, D, topk, key_mask is not None)
        return kernel_or_fallback("indexer_topk", shape_class,
                                  lambda: indexer_topk(q, w, k, q_positions, topk, key_mask),
                                  lambda: select_topk_blockwise(q, w, k, topk, q_positions, key_mask))
    if path == "blockwise":
        return select_topk_blockwise(q, w, k, topk, q_positions, key_mask)
    if path == "reference":
        return select_topk_reference(q, w, k, topk, q_positions, key_mask)
    raise ValueError(f"select_topk path {path!r}: expected one of {SELECT_PATHS}")


@torch.no_grad()
def select_topk_reference(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, topk: int, q_positions: torch.Tensor,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k over the full masked score matrix, exactly as transformers does. -> [B, S, min(topk, T)] int64.

    Like transformers, queries with fewer than k visible tokens get some masked (future) positions;
    attention masks those by causality. Exact ties at the k-th score keep the lowest positions
    (`lowest_position_ties`), where transformers keeps whichever `torch.topk` returns.
    """
    scores = index_scores(q, w, k)
    scores = scores.masked_fill(~causal_key_mask(q_positions, k.shape[1], key_mask), float("-inf"))
    values, indices = scores.topk(min(topk, scores.shape[-1]), dim=-1)
    return lowest_position_ties(scores, values, indices)


@torch.no_grad()
def select_topk_blockwise(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, topk: int, q_positions: torch.Tensor,
    key_mask: torch.Tensor | None = None, block: int | None = None,
) -> torch.Tensor:
    """Top-k per query, scoring one block of queries at a time so no [S, T] matrix exists at once (the C
    kernel's fallback and test reference).

    Each block only scores the keys up to its last query's position (causality). Slots that would
    hold an invisible (future or padded) key are set to -1. -> [B, S, topk] int64.
    """
    B, S, H, _ = q.shape
    T = k.shape[1]
    if block is None:
        # at least MIN_INDEXER_BLOCK queries: at 32K tokens, 16-query blocks cost 13.4 s vs 11.9 s (per-block overhead)
        block = max(MIN_INDEXER_BLOCK, block_budget(INDEXER_BLOCK_ELEMENTS, q.device) // max(1, B * H * T))
        block = min(S, block)
    out = torch.full((B, S, topk), -1, dtype=torch.long, device=q.device)
    for start in range(0, S, block):
        end = min(S, start + block)
        pos = q_positions[:, start:end]
        kv_end = min(T, int(pos.max().item()) + 1)  # keys beyond the block's last position are all invisible
        if kv_end <= 0:  # every query of the block before position 0 (padding): nothing visible, slots stay -1
            continue
        scores = index_scores(q[:, start:end], w[:, start:end], k[:, :kv_end])
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


@torch.no_grad()
def select_topk_cached(
    q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, topk: int, visible: torch.Tensor, static: bool = False,
) -> torch.Tensor:
    """The engine's selection over its cached keys [S, T, D] in one block, `visible` [S, Q, T] ->
    [S, Q, min(topk, T)] (-1 = empty). `static`: no host sync (the tie rule applied to every row)."""
    scores = index_scores(q, w, keys)
    scores.masked_fill_(~visible, float("-inf"))
    T = scores.shape[-1]
    if T > topk and static:
        values, indices = scores.topk(topk, dim=-1)
        indices = lowest_position_ties_static(scores, values, indices)
    elif T > topk:
        # one more than kept, sorted: only when the (k+1)-th equals the k-th can an exact tie cross the cut, and
        # only then does the tie rule have work (one tiny comparison per step)
        values, indices = scores.topk(topk + 1, dim=-1)
        tie = bool((values[..., -1] == values[..., -2]).any())
        values, indices = values[..., :-1], indices[..., :-1]
        if tie:  # it leaves rows with a -inf k-th value alone: `values` still marks empty slots
            indices = lowest_position_ties(scores, values, indices)
    else:
        values, indices = scores.topk(T, dim=-1)
    return indices.masked_fill(values == float("-inf"), -1)


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
