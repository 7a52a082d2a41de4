"""Model execution over the paged latent cache: one forward for a whole step of the running batch.

The tokens of all scheduled sequences are packed into one row [N] for everything that is per token
(embedding, projections, MoE); attention alone works per sequence, on a padded [S, Q] view of the queries:

    write    the step's latents (and indexer keys) go to their cache slots first, for every layer
    gather   each sequence's context [S, T, 576] is read from its blocks with one index tensor (ctx_slots)
    dense    while no context exceeds index_topk, absorbed MQA over all visible latents (every token would
             be selected, so the indexer is skipped exactly, as in the model)
    sparse   otherwise the indexer scores the cached indexer keys, each query keeps its top-k, and absorbed MQA
             runs over those k gathered latents only; IndexShare layers reuse the previous layer's top-k

W_UK is folded into the query and W_UV applied after attention, so no per-head K or V is ever built.
Pure PyTorch with no per-sequence or per-block Python loop inside the layers; runs wherever torch runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm5.engine.kv_cache import LatentKVCache
from glm5.engine.scheduler import ScheduledBatch
from glm5.model.mla import MLAttention
from glm5.model.transformer import GLM5ForCausalLM


@dataclass
class StepInputs:
    """Index tensors describing one step; shared by every layer."""

    input_ids: torch.Tensor  # [N] packed new tokens
    positions: torch.Tensor  # [N]
    slot_mapping: torch.Tensor  # [N] cache slot each new token is written to
    pad_index: torch.Tensor  # [S, Q] -> row of the packed tokens (padding points at row 0)
    unpad_index: torch.Tensor  # [N] -> flat index into S * Q
    ctx_slots: torch.Tensor  # [S, T] cache slot of each context position (padding -> slot 0)
    visible: torch.Tensor  # [S, Q, T] key t visible to query j of sequence s
    sparse: bool  # some context is longer than index_topk: run the indexer
    query_starts: list[int]  # per sequence, its first row in the packed tokens
    query_counts: list[int]


class ModelRunner:
    def __init__(self, model: GLM5ForCausalLM, cache: LatentKVCache, block_size: int) -> None:
        self.model = model
        self.cfg = model.config
        self.cache = cache
        self.block_size = block_size
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.index_topk = self.cfg.index_topk

    # ------------------------------------------------------------------ inputs
    def prepare(
        self, seqs, starts: list[int], counts: list[int], tokens: list[list[int]] | None = None
    ) -> StepInputs:
        """Index tensors for feeding tokens [starts[i], starts[i] + counts[i]) of each sequence.

        `tokens` overrides the ids fed (drafts, or MTP inputs); by default they are the sequence's own."""
        bs = self.block_size
        ids, positions, slots, unpad = [], [], [], []
        S, Q = len(seqs), max(counts)
        pad = [[0] * Q for _ in range(S)]
        query_starts = []
        row = 0
        for i, (seq, start, n) in enumerate(zip(seqs, starts, counts)):
            ids.extend(tokens[i] if tokens is not None else seq.token_ids[start : start + n])
            table = seq.block_table
            query_starts.append(row)
            for j in range(n):
                p = start + j
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
                pad[i][j] = row
                unpad.append(i * Q + j)
                row += 1
        device = self.device
        ctx_lens = [start + n for start, n in zip(starts, counts)]
        T = max(ctx_lens)
        nb = -(-T // bs)
        tables = torch.tensor([s.block_table[:nb] + [0] * (nb - len(s.block_table[:nb])) for s in seqs], dtype=torch.long)
        t = torch.arange(T)
        ctx_slots = tables[:, t // bs] * bs + (t % bs)
        q_pos = torch.tensor(
            [[starts[i] + min(j, counts[i] - 1) for j in range(Q)] for i in range(S)], dtype=torch.long
        )
        visible = t.view(1, 1, T) <= q_pos.unsqueeze(-1)
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            pad_index=torch.tensor(pad, dtype=torch.long, device=device),
            unpad_index=torch.tensor(unpad, dtype=torch.long, device=device),
            ctx_slots=ctx_slots.to(device),
            visible=visible.to(device),
            sparse=T > self.index_topk,
            query_starts=query_starts,
            query_counts=list(counts),
        )

    def prepare_batch(self, batch: ScheduledBatch) -> StepInputs:
        starts = [s.num_computed_tokens for s in batch.seqs]
        tokens = None
        if any(batch.num_draft_tokens):
            tokens = [
                s.token_ids[start : start + n - k] + s.draft_token_ids[:k]
                for s, start, n, k in zip(batch.seqs, starts, batch.num_new_tokens, batch.num_draft_tokens)
            ]
        return self.prepare(batch.seqs, starts, batch.num_new_tokens, tokens)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """-> final-normed hidden states [N, hidden] of the packed new tokens (their KV now cached)."""
        model = self.model.model
        x = model.embed_tokens(inputs.input_ids).unsqueeze(0)  # [1, N, hidden]
        cos, sin = model.rotary_emb(inputs.positions.unsqueeze(0), x.dtype)
        topk = None
        for i, layer in enumerate(model.layers):
            attn_out, topk = self.attention(layer.self_attn, i, layer.input_layernorm(x), cos, sin, inputs, topk)
            x = x + attn_out
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.norm(x)[0]

    @torch.no_grad()
    def forward_mtp(self, inputs: StepInputs, hidden: torch.Tensor, depth: int = 0) -> torch.Tensor:
        """The MTP layer on packed rows: hidden [N, hidden] of the main model at each position, inputs' ids are
        the NEXT tokens. -> its normed output [N, hidden]; lm_head of it predicts the token after next."""
        layer = self.model.mtp[depth]
        model = self.model.model
        next_embeds = model.embed_tokens(inputs.input_ids).unsqueeze(0)
        cos, sin = model.rotary_emb(inputs.positions.unsqueeze(0), next_embeds.dtype)
        x = layer.eh_proj(torch.cat([layer.enorm(next_embeds), layer.hnorm(hidden.unsqueeze(0))], dim=-1))
        cache_layer = self.cfg.num_hidden_layers + depth
        attn_out, _ = self.attention(layer.self_attn, cache_layer, layer.input_layernorm(x), cos, sin, inputs, None)
        x = x + attn_out
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return layer.shared_head.norm(x)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    # ------------------------------------------------------------------ attention over the cache
    def attention(
        self, attn: MLAttention, cache_layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        inputs: StepInputs, prev_topk: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [1, N, hidden] (normed) -> attention output [1, N, hidden], and the top-k used ([S, Q, k] positions,
        -1 = empty; None on the dense path) for an IndexShare layer after it."""
        N = x.shape[1]
        q_nope, q_rope, q_resid = attn.project_q(x, cos, sin)  # [1, N, H, nope], [1, N, H, rope]
        latent_cache = self.cache.latent[cache_layer]
        latent_cache.index_copy_(0, inputs.slot_mapping, attn.project_latent(x, cos, sin)[0])
        indexer = attn.indexer
        if indexer is not None:
            key_cache = self.cache.index_keys[cache_layer]
            key_cache.index_copy_(0, inputs.slot_mapping, indexer.keys(x, cos, sin)[0].to(key_cache.dtype))
        w_uk, w_uv = attn.absorbed_weights()
        H, L = attn.num_heads, attn.latent_dim
        q_latent = torch.bmm(q_nope[0].transpose(0, 1), w_uk)  # [H, N, nope] @ [H, nope, L] -> [H, N, L]
        q = torch.cat([q_latent.transpose(0, 1), q_rope[0]], dim=-1)[inputs.pad_index]  # [S, Q, H, L + R]
        S, Q, _, D = q.shape
        context = latent_cache[inputs.ctx_slots]  # [S, T, L + R]
        T = context.shape[1]
        topk = None
        if inputs.sparse:
            if indexer is not None:
                q_idx, w_idx = indexer.queries(x, q_resid, cos, sin)  # [1, N, h, d], [1, N, h]
                keys = self.cache.index_keys[cache_layer][inputs.ctx_slots]  # [S, T, d]
                scores = indexer.scores(q_idx[0][inputs.pad_index], w_idx[0][inputs.pad_index], keys)  # [S, Q, T]
                scores.masked_fill_(~inputs.visible, float("-inf"))
                values, topk = scores.topk(min(self.index_topk, T), dim=-1)
                topk = topk.masked_fill(values == float("-inf"), -1)
            else:
                topk = prev_topk
                if topk is None:
                    raise ValueError("an IndexShare layer needs the previous layer's top-k")
            K = topk.shape[-1]
            offsets = (torch.arange(S, device=q.device) * T).view(S, 1, 1)
            gathered = context.reshape(S * T, D)[(topk.clamp(min=0) + offsets).reshape(-1)].view(S, Q, K, D)
            scores = torch.matmul(q, gathered.transpose(-1, -2)).float() * attn.scale  # [S, Q, H, K]
            scores.masked_fill_((topk < 0).unsqueeze(2), float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            out = torch.matmul(probs, gathered[..., :L])  # [S, Q, H, L]
        else:
            scores = torch.bmm(q.reshape(S, Q * H, D), context.transpose(1, 2)).float() * attn.scale
            scores = scores.view(S, Q, H, T).masked_fill_(~inputs.visible.unsqueeze(2), float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            out = torch.bmm(probs.view(S, Q * H, T), context[..., :L]).view(S, Q, H, L)
        out = out.reshape(S * Q, H, L)[inputs.unpad_index]  # [N, H, L]
        out = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2))  # [H, N, L] @ [H, L, v] -> [H, N, v]
        return attn.o_proj(out.transpose(0, 1).reshape(1, N, -1)), topk
