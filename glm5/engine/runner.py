"""Model execution over the paged latent cache: one forward for a whole step of the running batch.

The tokens of all scheduled sequences are packed into one row [N] for everything that is per token
(embedding, projections, MoE); attention alone works per sequence, on a padded [S, Q] view of the queries:

    write    the step's latents (and indexer keys) go to their cache slots first, for every layer
    gather   cache rows are read through one index tensor per step (ctx_slots [S, T]: block tables resolved)
    dense    while no context exceeds index_topk, absorbed MQA over all visible latents (every token would
             be selected, so the indexer is skipped exactly, as in the model)
    sparse   otherwise the indexer scores the cached indexer keys [S, T, 128], each query keeps its top-k, and
             absorbed MQA runs over those k latents only, read straight from the cache (never all T of them);
             IndexShare layers reuse the previous layer's top-k

W_UK is folded into the query and W_UV into the output projection, so no per-head K or V is ever built.
Few ops per layer matter more than FLOPs at small batch on a CPU, so `FusedMLA` precomputes, once, from the
model's weights: one matmul for everything read from the layer input (q_a, kv_a, indexer key and head
weights), one for everything read from the q residual (the absorbed per-head latent query with the softmax
scale folded in, the rope query, the indexer query), and W_UV folded into o_proj. RoPE is one batched matmul
with per-position rotation matrices built once per step. (For the released 744B widths the absorbed q and o
weights are ~2x the originals: the trade a decode engine makes; call `LLMEngine.refresh_weights()` after
changing the model's weights.)
Pure PyTorch with no per-sequence or per-block Python loop inside the layers; runs wherever torch runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glm5.engine.kv_cache import LatentKVCache
from glm5.engine.scheduler import ScheduledBatch
from glm5.kernels import linear as linear_kernel
from glm5.kernels.check import kernel_or_fallback, size_class
from glm5.model.indexer import select_topk
from glm5.model.mla import MLAttention
from glm5.model.moe import MoE
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
    rotation: torch.Tensor | None = None  # [N, R, R] RoPE matrices, built on first use
    # no host sync and no data-dependent shape anywhere in the forward (a CUDA graph replays it; see
    # glm5/engine/cuda_graphs.py): tie-breaking and the MoE take their sync-free forms
    static: bool = False


def static_step_inputs(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, ctx_slots: torch.Tensor,
                       index_topk: int) -> StepInputs:
    """StepInputs of a static step (compiled steps, CUDA graphs, speculative cycles) in the padded layout: S
    sequences (ctx_slots [S, T]) of Q = N / S rows each, row i * Q + j being sequence i's token j (padding rows
    included); the visibility mask is computed from the positions."""
    S, T = ctx_slots.shape
    Q = ids.shape[0] // S
    rows = torch.arange(S * Q, device=ids.device)
    visible = torch.arange(T, device=ids.device).view(1, 1, T) <= positions.view(S, Q, 1)
    return StepInputs(
        input_ids=ids, positions=positions, slot_mapping=slots, pad_index=rows.view(S, Q), unpad_index=rows,
        ctx_slots=ctx_slots, visible=visible, sparse=T > index_topk, query_starts=[i * Q for i in range(S)],
        query_counts=[Q] * S, static=True,
    )


class ModelRunner:
    def __init__(self, model: GLM5ForCausalLM, cache: LatentKVCache, block_size: int) -> None:
        self.model = model
        self.cfg = model.config
        self.cache = cache
        self.block_size = block_size
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.index_topk = self.cfg.index_topk
        self.fused: dict[int, FusedMLA] = {}
        self.graphs = None  # the StepGraphs replaying this runner's forward, if any

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
            attn_out, topk = self.attention(layer.self_attn, i, _norm(layer.input_layernorm, x), cos, sin, inputs, topk)
            x = x + attn_out
            x = x + self.mlp(layer.mlp, _norm(layer.post_attention_layernorm, x), inputs.static)
        return _norm(model.norm, x)[0]

    def mlp(self, mlp, x: torch.Tensor, static: bool = False) -> torch.Tensor:
        """The layer's dense MLP or MoE on x [1, N, hidden]. The routed experts go through the model's own
        dispatcher (`glm5.model.experts`: the per-token path at decode sizes, the sync-free forms when `static`);
        the shared expert and dense MLPs through `dense_mlp` (the runner's `linear`)."""
        flat = x[0]
        if not isinstance(mlp, MoE):
            return dense_mlp(mlp, flat).unsqueeze(0)
        return (mlp.routed(flat, static=static) + dense_mlp(mlp.shared_experts, flat)).unsqueeze(0)

    @torch.no_grad()
    def forward_mtp(self, inputs: StepInputs, hidden: torch.Tensor, depth: int = 0) -> torch.Tensor:
        """The MTP layer on packed rows: hidden [N, hidden] of the main model at each position, inputs' ids are
        the NEXT tokens. -> its normed output [N, hidden]; lm_head of it predicts the token after next."""
        layer = self.model.mtp[depth]
        model = self.model.model
        next_embeds = model.embed_tokens(inputs.input_ids).unsqueeze(0)
        cos, sin = model.rotary_emb(inputs.positions.unsqueeze(0), next_embeds.dtype)
        # the main stack's fast paths (fused norms, the short MoE path): drafting runs every step, so its
        # cost decides whether speculation pays on a CPU
        joined = torch.cat([_norm(layer.enorm, next_embeds), _norm(layer.hnorm, hidden.unsqueeze(0))], dim=-1)
        x = linear(joined[0], dense_weight(layer.eh_proj, joined.dtype), getattr(layer.eh_proj, "bias", None)).unsqueeze(0)
        cache_layer = self.cfg.num_hidden_layers + depth
        attn_out, _ = self.attention(layer.self_attn, cache_layer, _norm(layer.input_layernorm, x), cos, sin, inputs, None)
        x = x + attn_out
        x = x + self.mlp(layer.mlp, _norm(layer.post_attention_layernorm, x), inputs.static)
        return _norm(layer.shared_head.norm, x)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.lm_head
        if type(head) is nn.Linear and head.bias is None:  # (a quantized head runs its own forward)
            return linear(hidden, head.weight).float()
        return head(hidden).float()

    # ------------------------------------------------------------------ attention over the cache
    def attention(
        self, attn: MLAttention, cache_layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        inputs: StepInputs, prev_topk: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [1, N, hidden] (normed) -> attention output [1, N, hidden], and the top-k used ([S, Q, k] positions,
        -1 = empty; None on the dense path) for an IndexShare layer after it."""
        fused = self.fused_for(attn)
        rot = self._rotation(inputs, cos, sin)
        return fused(x[0], rot, self.cache.latent[cache_layer], self.cache.index_keys[cache_layer], inputs,
                     prev_topk, self.index_topk)

    def fused_for(self, attn: MLAttention) -> FusedMLA:
        fused = self.fused.get(id(attn))
        if fused is None:
            fused = self.fused[id(attn)] = FusedMLA(attn)
        return fused

    def build_fused(self) -> None:
        """Make every layer's fused weights now (before a CUDA graph capture, which must not allocate them)."""
        for layer in list(self.model.model.layers) + list(self.model.mtp):
            self.fused_for(layer.self_attn)

    def _rotation(self, inputs: StepInputs, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Per-position RoPE as a matrix [N, R, R]: x @ rot rotates the interleaved pairs of x and writes them
        de-interleaved, exactly `apply_rope_interleaved`. Built once per step, shared by every layer."""
        if inputs.rotation is not None and inputs.rotation.dtype == cos.dtype:
            return inputs.rotation
        c, s = cos[0], sin[0]  # [N, R/2]
        N, half = c.shape
        rot = torch.zeros(N, 2 * half, 2 * half, dtype=c.dtype, device=c.device)
        i = torch.arange(half, device=c.device)
        rot[:, 2 * i, i] = c
        rot[:, 2 * i + 1, i] = -s
        rot[:, 2 * i + 1, half + i] = c
        rot[:, 2 * i, half + i] = s
        inputs.rotation = rot
        return rot

    def refresh_weights(self) -> None:
        """Rebuild the fused weights (after the model's weights changed); captured CUDA graphs, which read the
        old fused tensors, are dropped too (re-captured on use)."""
        self.fused.clear()
        if self.graphs is not None:
            self.graphs.reset()


# fp32 matmuls of a few rows on CUDA: cuBLAS's own kernel choice took ~30 us for [8, 256] x [256, 256] on an
# H200, its cuBLASLt path (which PyTorch takes for a matmul with a bias) ~12 us (dev/gemm_small_m.py); so the
# runner's linears get a zero bias there. Same products, one more add of zero.
ZERO_BIAS_DEVICES = ("cuda",)
_zero_biases: dict[tuple, torch.Tensor] = {}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with a zero bias for fp32 on ZERO_BIAS_DEVICES (see above); on a CPU in fp32 with a few rows,
    `glm5.kernels.linear` where the startup check finds it faster (BLAS reads the weight several times slower
    for 2-3 rows than for one: a speculative verify step's lm_head took 3x a plain step's)."""
    if bias is None and x.dtype == torch.float32 and x.dim() == 2:
        if x.device.type in ZERO_BIAS_DEVICES:
            key = (weight.shape[0], x.device)
            bias = _zero_biases.get(key)
            if bias is None:
                bias = _zero_biases[key] = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device)
        elif x.device.type == "cpu" and 0 < x.shape[0] <= linear_kernel.MAX_ROWS:
            return kernel_or_fallback("linear_rows", (size_class(x.shape[0]), weight.shape[0], weight.shape[1]),
                                      lambda: linear_kernel.linear_rows(x, weight), lambda: F.linear(x, weight))
    return F.linear(x, weight, bias)


def dense_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """An MLP (SwiGLU) on x [N, hidden] without autograd: `linear` for each projection, SwiGLU in place."""
    gate, up = linear(x, dense_weight(mlp.gate_proj, x.dtype)), linear(x, dense_weight(mlp.up_proj, x.dtype))
    return linear(F.silu(gate, inplace=True).mul_(up), dense_weight(mlp.down_proj, x.dtype))


# Quantized modules (FP8Linear / FP8Experts, glm5.quant.lowbit_model's QuantLinear / QuantExperts) hold packed
# weights; the runner asks each module for its dense weight instead of reading `.weight`, so every checkpoint
# format runs through the same fused paths. Linears read this way are dequantized per step (the memory stays
# the packed one); FusedMLA's weights are built once, dense.
def dense_weight(module, dtype: torch.dtype) -> torch.Tensor:
    """A linear-like module's weight [out, in] in `dtype`: nn.Linear's own, a quantized module's expanded."""
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight(dtype)
    return module.weight if module.weight.dtype == dtype else module.weight.to(dtype)


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    return _rms_norm(x, norm.weight, norm.eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # as glm5.model.layers.RMSNorm
    return weight * normed.to(x.dtype)


class FusedMLA(nn.Module):
    """An MLAttention layer's weights rearranged for decoding over the latent cache (see the module docstring).
    A module whose rearranged weights are buffers: a compiled step (glm5/engine/compiled.py) freezes them as
    it freezes the model's parameters."""

    @torch.no_grad()
    def __init__(self, attn: MLAttention) -> None:
        super().__init__()
        H, nope, R, L = attn.num_heads, attn.nope_dim, attn.rope_dim, attn.latent_dim
        self.H, self.R, self.L = H, R, L
        self.q_lora = attn.q_a_proj.out_features
        dtype = attn.kv_b_proj.weight.dtype  # kv_b_proj is never packed (MLA takes its weight apart)
        indexer = attn.indexer
        w_uk, w_uv = (w.double() for w in attn.absorbed_weights())  # [H, nope, L], [H, v, L]
        # from the layer input: q_a | kv_a (latent, rope key) | indexer key | indexer head weights (fp32 only)
        rows = [dense_weight(attn.q_a_proj, dtype), dense_weight(attn.kv_a_proj_with_mqa, dtype)]
        biases = [attn.q_a_proj.bias, attn.kv_a_proj_with_mqa.bias]
        self.index_weights_fused = False
        if indexer is not None:
            rows.append(dense_weight(indexer.wk, dtype))
            biases.append(None)
            self.index_heads, self.index_dim = indexer.n_heads, indexer.head_dim
            # relu(c * s) = c * relu(s), c > 0: the indexer's two scales fold into its head weights
            self.index_weight_scale = indexer.n_heads**-0.5 * indexer.softmax_scale
            if dtype == torch.float32:
                rows.append(indexer.weights_proj.weight * self.index_weight_scale)
                biases.append(None)
                self.index_weights_fused = True
            else:
                self.weights_proj = indexer.weights_proj.weight
            self.k_norm = (indexer.k_norm.weight, indexer.k_norm.bias, indexer.k_norm.eps)
        self.w_in = torch.cat([r.to(dtype) for r in rows], 0)
        self.b_in = None
        if any(b is not None for b in biases):
            self.b_in = torch.cat([b if b is not None else torch.zeros(r.shape[0], dtype=dtype, device=r.device)
                                   for r, b in zip(rows, biases)])
        self.in_splits = [r.shape[0] for r in rows]
        # from the q residual: per-head latent query (W_UK absorbed) | rope query, both scaled | indexer query
        w_qb = dense_weight(attn.q_b_proj, dtype).double().view(H, nope + R, self.q_lora)
        q_latent = torch.einsum("hnl,hnq->hlq", w_uk, w_qb[:, :nope]).reshape(H * L, self.q_lora) * attn.scale
        q_rope = w_qb[:, nope:].reshape(H * R, self.q_lora) * attn.scale
        q_rows = [q_latent, q_rope] + ([dense_weight(indexer.wq_b, dtype).double()] if indexer is not None else [])
        self.w_q = torch.cat(q_rows, 0).to(dtype)
        self.q_splits = [r.shape[0] for r in q_rows]
        # output: o_proj(W_UV out_latent) = (o_proj . W_UV) out_latent
        w_o = dense_weight(attn.o_proj, dtype).double().view(-1, H, attn.v_dim)  # [hidden, H, v]
        self.w_o = torch.einsum("ohv,hvl->ohl", w_o, w_uv).reshape(-1, H * L).to(dtype)
        self.b_o = attn.o_proj.bias
        self.q_norm = (attn.q_a_layernorm.weight, attn.q_a_layernorm.eps)
        self.kv_norm = (attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps)
        for name in ("w_in", "b_in", "w_q", "w_o"):
            value = self.__dict__.pop(name)
            self.register_buffer(name, value, persistent=False)

    def forward(
        self, x: torch.Tensor, rot: torch.Tensor, latent_cache: torch.Tensor, key_cache: torch.Tensor | None,
        inputs: StepInputs, prev_topk: torch.Tensor | None, index_topk: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        N = x.shape[0]
        H, R, L = self.H, self.R, self.L
        parts = linear(x, self.w_in, self.b_in).split(self.in_splits, dim=-1)
        q_resid = _rms_norm(parts[0], *self.q_norm)
        latent, k_rope = parts[1].split([L, R], dim=-1)
        k_rope = torch.bmm(k_rope.unsqueeze(1), rot).squeeze(1)  # [N, R]
        latent_cache.index_copy_(0, inputs.slot_mapping, torch.cat([_rms_norm(latent, *self.kv_norm), k_rope], -1))
        has_indexer = key_cache is not None
        if has_indexer:
            k_idx = F.layer_norm(parts[2], (self.index_dim,), *self.k_norm)
            k_idx = torch.cat([torch.bmm(k_idx[:, None, :R], rot).squeeze(1), k_idx[:, R:]], -1)
            key_cache.index_copy_(0, inputs.slot_mapping, k_idx.to(key_cache.dtype))
        q_parts = linear(q_resid, self.w_q).split(self.q_splits, dim=-1)
        q_rope = torch.bmm(q_parts[1].view(N, H, R), rot)  # [N, H, R]
        q = torch.cat([q_parts[0].view(N, H, L), q_rope], dim=-1)  # [N, H, L + R], scale folded in
        decode = inputs.pad_index.shape[1] == 1
        q = q.unsqueeze(1) if decode else q[inputs.pad_index]  # [S, Q, H, D]
        S, Q, _, D = q.shape
        T = inputs.ctx_slots.shape[1]
        topk = None
        if inputs.sparse:
            if has_indexer:
                q_idx = q_parts[2].view(N, self.index_heads, self.index_dim)
                q_idx = torch.cat([torch.bmm(q_idx[..., :R], rot), q_idx[..., R:]], -1)
                if self.index_weights_fused:
                    w_idx = parts[3]
                else:
                    w_idx = F.linear(x.float(), self.weights_proj.float()) * self.index_weight_scale
                if not decode:
                    q_idx, w_idx = q_idx[inputs.pad_index], w_idx[inputs.pad_index]
                keys = key_cache.index_select(0, inputs.ctx_slots.view(-1)).view(S, T, -1).float()  # [S, T, d]
                # the model's own selection (glm5.model.indexer), over the cached keys
                topk = select_topk(q_idx.reshape(S, Q, self.index_heads, -1), w_idx.reshape(S, Q, -1), keys, index_topk,
                                   visible=inputs.visible, static=inputs.static)
            else:
                topk = prev_topk
                if topk is None:
                    raise ValueError("an IndexShare layer needs the previous layer's top-k")
            K = topk.shape[-1]
            if T * D + Q * H * T < Q * K * D:
                # short contexts with many queries (prefill): the top-k as a mask over all T latents reads
                # less than gathering k rows per query; same softmax over the same keys
                context = latent_cache.index_select(0, inputs.ctx_slots.view(-1)).view(S, T, D)
                selected = torch.zeros(S, Q, T + 1, dtype=torch.bool, device=q.device)
                selected.scatter_(-1, topk.masked_fill(topk < 0, T), True)  # empty slots land in column T
                scores = torch.bmm(q.reshape(S, Q * H, D), context.transpose(1, 2)).float().view(S, Q, H, T)
                scores.masked_fill_(~selected[..., :T].unsqueeze(2), float("-inf"))
                probs = torch.softmax(scores, dim=-1).to(q.dtype)
                out = torch.bmm(probs.view(S, Q * H, T), context[..., :L])  # [S, Q * H, L]
            else:
                # only the selected rows are read from the cache: [S, Q, K] positions -> slots -> latents
                slots = inputs.ctx_slots.gather(1, topk.clamp(min=0).view(S, Q * K))
                gathered = latent_cache.index_select(0, slots.view(-1)).view(S, Q, K, D)
                scores = torch.matmul(q, gathered.transpose(-1, -2)).float()  # [S, Q, H, K]
                scores.masked_fill_((topk < 0).unsqueeze(2), float("-inf"))
                probs = torch.softmax(scores, dim=-1).to(q.dtype)
                out = torch.matmul(probs, gathered[..., :L])  # [S, Q, H, L]
        else:
            context = latent_cache.index_select(0, inputs.ctx_slots.view(-1)).view(S, T, D)  # every visible row
            scores = torch.bmm(q.reshape(S, Q * H, D), context.transpose(1, 2)).float()
            scores = scores.view(S, Q, H, T).masked_fill_(~inputs.visible.unsqueeze(2), float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            out = torch.bmm(probs.view(S, Q * H, T), context[..., :L])  # [S, Q * H, L]
        out = out.reshape(S * Q, H * L)
        if not decode:
            out = out[inputs.unpad_index]
        return linear(out, self.w_o, self.b_o).unsqueeze(0), topk
