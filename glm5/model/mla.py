"""Multi-head Latent Attention with DeepSeek Sparse Attention (the `self_attn` of every GLM-5 layer).

Per token the layer keeps a kv_lora_rank-wide normed latent plus one shared qk_rope_head_dim-wide roped key
(576 values for GLM-5); per-head keys and values are `kv_b_proj(latent)`.

`attn_impl` (the documented switch, set on the model with `model.set_attn_impl(...)`):
  "reference"  expand the latent to per-head K/V, full T x T scores, top-k applied as a mask: transformers' math
  "sparse"     absorbed MQA over the latent: W_UK folded into the query, attention over each query's top-k
               gathered latents, W_UV applied afterwards; T <= index_topk is plain causal attention (the
               indexer is skipped: every token would be selected)
Both agree within 1e-5 in fp32 (tests/test_model_parity.py).

Two switches for DSA training (glm5/train), off by default so the normal forward is unchanged:
  dense_attention     attend to every earlier token, no top-k (MLA pretraining before DSA, the dense warm-up)
  sparse_as_mask      run the sparse path's top-k attention as dense latent attention under a selection mask:
                      the same math, and on a CPU far faster at training lengths (one matmul per batch instead
                      of many tiny gathered ones); O(T^2) memory, so for short sequences only
  indexer_loss_mode   "dense" | "sparse": the forward also stores `indexer_kl`, the KL from the main attention's
                      head-summed distribution to the indexer's softmax (over all earlier tokens, or only over
                      the selected ones); the indexer sees a detached input, so it learns only from this loss
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm5.config import GLM5Config
from glm5.kernels import latent_attention_runs
from glm5.model.dsa import sparse_latent_attention
from glm5.model.indexer import Indexer, causal_key_mask, select_topk
from glm5.model.layers import RMSNorm, apply_rope_interleaved
from glm5.model.masked_attention import masked_latent_attention

ATTN_IMPLS = ("reference", "sparse")


# Training-length attention on a CPU through glm5.model.masked_attention (switch for benchmarks and debugging)
USE_MASKED_LATENT_ATTENTION = True


class MLAttention(nn.Module):
    def __init__(self, cfg: GLM5Config, has_indexer: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.latent_dim = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.dropout = cfg.attention_dropout
        self.attn_impl = "sparse"
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # fixed 1e-6, not rms_norm_eps
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.num_heads * (self.nope_dim + self.rope_dim), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.latent_dim + self.rope_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.latent_dim, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.indexer = Indexer(cfg) if has_indexer else None
        # DSA training switches (see the module docstring); the trainer sets them per stage
        self.dense_attention = False
        self.sparse_as_mask = False
        self.indexer_loss_mode: str | None = None
        self.indexer_kl: torch.Tensor | None = None  # scalar, set by forward when indexer_loss_mode is on

    # ------------------------------------------------------------------ pieces reused by the engine
    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """-> q_nope [B, S, H, nope], roped q_rope [B, S, H, rope], q_resid [B, S, q_lora_rank]."""
        B, S, _ = x.shape
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_resid).view(B, S, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope_interleaved(q_rope, cos, sin), q_resid

    def project_latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """-> kv [B, T, latent + rope]: the normed latent and the roped shared key (what a KV cache stores)."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(latent), apply_rope_interleaved(k_rope, cos, sin)], dim=-1)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, latent] and W_UV [H, v, latent], views of kv_b_proj.weight."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.latent_dim)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q_positions: torch.Tensor,
        prev_topk: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, hidden] (prefill / training: queries and keys are the same tokens).

        Returns the output [B, T, hidden] and this layer's top-k [B, T, k] (None when the sparse path skipped
        the indexer), which an IndexShare layer after it reuses.
        """
        B, T, _ = x.shape
        q_nope, q_rope, q_resid = self.project_q(x, cos, sin)
        kv = self.project_latent(x, cos, sin)
        sparse = self.attn_impl == "sparse"
        need_topk = (not sparse or T > self.cfg.index_topk) and not self.dense_attention
        topk = None if self.dense_attention else prev_topk
        kl_mode = self.indexer_loss_mode if self.indexer is not None else None
        if self.indexer is not None and (need_topk or kl_mode):
            # the indexer's KL must not train the model under it: its input is detached in training mode
            idx_x, idx_resid = (x.detach(), q_resid.detach()) if kl_mode else (x, q_resid)
            q_idx, w_idx = self.indexer.queries(idx_x, idx_resid, cos, sin)
            k_idx = self.indexer.keys(idx_x, cos, sin)
            if need_topk:
                topk = select_topk(q_idx, w_idx * self.indexer.softmax_scale, k_idx, self.indexer.index_topk,
                                   q_positions=q_positions, key_mask=key_mask, path=None if sparse else "reference")
            if kl_mode:
                selected = topk if (need_topk and kl_mode == "sparse") else None
                self.indexer_kl = self._indexer_kl(q_idx, w_idx, k_idx, q_nope, q_rope, kv, selected, q_positions, key_mask)
        elif self.indexer is None and need_topk and topk is None:
            raise ValueError("a layer without an indexer (IndexShare 'shared') needs the previous layer's top-k")
        if sparse:
            out = self._sparse(q_nope, q_rope, kv, topk if need_topk else None, q_positions, key_mask)
        else:
            out = self._reference(q_nope, q_rope, kv, topk, q_positions, key_mask)
        return self.o_proj(out.reshape(B, T, -1)), (topk if need_topk else None)

    def _indexer_kl(self, q_idx, w_idx, k_idx, q_nope, q_rope, kv, topk, q_positions, key_mask) -> torch.Tensor:
        """Mean over queries of KL(p || softmax(I)): p is the main attention's probabilities summed over heads and
        L1-normalized (no gradient), I the indexer's scores (gradient to the indexer only). With `topk` both are
        restricted to each query's selected keys (the sparse stage). O(T^2): for training lengths only."""
        B, T = kv.shape[:2]
        S, H = q_nope.shape[1], self.num_heads
        allowed = causal_key_mask(q_positions, T, key_mask).expand(B, -1, -1)  # [B, S, T]
        if topk is not None:
            allowed = allowed & selection_mask(topk, T)
        with torch.no_grad():
            # the main attention in MQA form over the latent (every head reads the same kv): one matmul, no
            # per-head copy; masked with a finite minimum so that a row with no allowed key gives no NaN (it
            # is zeroed after the head sum, a 4x smaller tensor than the per-head probabilities)
            w_uk, _ = self.absorbed_weights()
            q = torch.cat([torch.einsum("bthn,hnl->bthl", q_nope, w_uk), q_rope], dim=-1).float()  # [B, S, H, L+R]
            scores = torch.bmm(q.reshape(B, S * H, -1), kv.float().transpose(1, 2)).mul_(self.scale).view(B, S, H, T)
            scores.masked_fill_(~allowed.unsqueeze(2), torch.finfo(scores.dtype).min)
            target = torch.softmax(scores, dim=-1).sum(dim=2).masked_fill_(~allowed, 0.0)  # [B, S, T]
            target = target / target.sum(dim=-1, keepdim=True).clamp_min(1e-12)
            entropy = torch.special.xlogy(target, target).sum(dim=-1)  # sum p log p, [B, S]
        index_scores = self.indexer.scores(q_idx, w_idx, k_idx).masked_fill(~allowed, float("-inf"))
        log_q = torch.log_softmax(index_scores, dim=-1).masked_fill(~allowed, 0.0)
        kl = entropy - (target * log_q).sum(dim=-1)  # [B, S]
        valid = allowed.any(dim=-1)
        return (kl * valid).sum() / valid.sum().clamp_min(1)

    def _reference(self, q_nope, q_rope, kv, topk, q_positions, key_mask) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        latent, k_rope = kv.split([self.latent_dim, self.rope_dim], dim=-1)
        k_nope, v = self.kv_b_proj(latent).view(B, T, H, self.nope_dim + self.v_dim).split(
            [self.nope_dim, self.v_dim], dim=-1
        )
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, T, D]
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, T, H, self.rope_dim)], dim=-1).transpose(1, 2)
        allowed = causal_key_mask(q_positions, T, key_mask)  # [B, T, T]
        if topk is not None:
            selected = selection_mask(topk, T)
            allowed = allowed & selected
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~allowed.unsqueeze(1), torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=self.dropout, training=self.training)
        return torch.matmul(probs, v.transpose(1, 2)).transpose(1, 2)  # [B, T, H, v]

    def _sparse(self, q_nope, q_rope, kv, topk, q_positions, key_mask) -> torch.Tensor:
        w_uk, w_uv = self.absorbed_weights()
        # fold W_UK into the query: [B, T, H, nope] x [H, nope, L] -> [B, T, H, L]
        q_latent = torch.einsum("bthn,hnl->bthl", q_nope, w_uk)
        q = torch.cat([q_latent, q_rope], dim=-1)  # [B, T, H, L + R]
        dropout_p = self.dropout if self.training else 0.0
        if topk is None:  # every earlier token is selected: plain causal attention over the latent
            out = self._dense_latent(q, kv, q_positions, key_mask, dropout_p)
        elif self.sparse_as_mask and not (dropout_p == 0.0 and latent_attention_runs(q, kv)):
            # (the CPU kernel's sparse forward + backward beats the mask; the mask beats PyTorch's gathers)
            out = self._dense_latent(q, kv, q_positions, key_mask, dropout_p, selected=selection_mask(topk, kv.shape[1]))
        else:
            out = sparse_latent_attention(q, kv, topk, q_positions, self.scale, self.latent_dim, dropout_p=dropout_p)
        return torch.einsum("bthl,hvl->bthv", out, w_uv)

    def _dense_latent(self, q, kv, q_positions, key_mask, dropout_p: float = 0.0, selected=None) -> torch.Tensor:
        B, S, H, D = q.shape
        T = kv.shape[1]
        if USE_MASKED_LATENT_ATTENTION and q.device.type == "cpu" and dropout_p == 0.0:
            # MQA over the latent, blocked over queries, skipping the causal upper triangle: 2-2.5x faster than
            # SDPA on per-head copies of the latent on a CPU (CUDA keeps SDPA's fused kernels)
            allowed = causal_key_mask(q_positions, T, key_mask).expand(B, S, T)
            if selected is not None:
                allowed = allowed & selected
            key_ends = q_positions.reshape(-1, S).amax(dim=0) + 1  # causal: no key beyond a query's position
            return masked_latent_attention(q, kv, allowed, self.scale, self.latent_dim, key_ends=key_ends)
        k = kv.unsqueeze(1).expand(B, H, T, D)
        v = kv[..., : self.latent_dim].unsqueeze(1).expand(B, H, T, self.latent_dim)
        if selected is not None:  # [B, S, T]: the top-k as a mask (sparse_as_mask)
            mask = (causal_key_mask(q_positions, T, key_mask) & selected).unsqueeze(1)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=self.scale, dropout_p=dropout_p)
            return torch.nan_to_num(out, nan=0.0).transpose(1, 2)
        if key_mask is None and S == T:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, scale=self.scale, dropout_p=dropout_p)
        else:
            mask = causal_key_mask(q_positions, T, key_mask).unsqueeze(1)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=self.scale, dropout_p=dropout_p)
            out = torch.nan_to_num(out, nan=0.0)
        return out.transpose(1, 2)  # [B, S, H, L]


def selection_mask(topk: torch.Tensor, num_keys: int) -> torch.Tensor:
    """topk [B, S, k] key positions (-1 = empty slot) -> boolean [B, S, num_keys], True where selected."""
    # a -1 slot scatters into a spare column that is then dropped
    slots = torch.where(topk >= 0, topk, torch.full_like(topk, num_keys))
    selected = torch.zeros(*topk.shape[:2], num_keys + 1, dtype=torch.bool, device=topk.device)
    return selected.scatter_(-1, slots, True)[..., :num_keys]
