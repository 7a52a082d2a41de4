"""The GLM-5 model: decoder layers (MLA + DSA attention, dense MLP or MoE), the MTP module, the LM head.

    import torch
    from glm5 import GLM5Config, GLM5ForCausalLM
    model = GLM5ForCausalLM(GLM5Config.from_preset("nano"))
    out = model(torch.randint(0, 4096, (2, 256)), return_mtp=True)
    out.logits        # [batch, seq, vocab]
    out.mtp_logits    # [batch, seq - 1, vocab]: position t predicts token t + 2

Module names and parameter shapes are transformers' `GlmMoeDsaForCausalLM`'s, so a state_dict moves across
unchanged; the MTP layer (which transformers does not model) lives at `mtp.{i}` here and is written to disk as
layer `num_hidden_layers + i` in the official checkpoint layout (see glm5/checkpoint.py).
Single-device code: parallelism is applied from outside.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glm5.config import GLM5Config
from glm5.model.layers import MLP, RMSNorm, RotaryEmbedding, no_autograd
from glm5.model.loss import IGNORE_INDEX, cross_entropy_sum, linear_cross_entropy, next_token_targets
from glm5.model.mla import ATTN_IMPLS, MLAttention
from glm5.model.moe import MoE


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, T, vocab]; None when the forward was given `targets`
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # final-normed hidden states [B, T, hidden]
    mtp_logits: list[torch.Tensor] | None = None  # per MTP depth d: [B, T - d, vocab], predicts token t + 1 + d
    topk_indices: list[torch.Tensor | None] | None = None  # per layer, the DSA selection (None: indexer skipped)
    # with `targets`: summed fp32 cross-entropies (what training divides by the step's target count)
    lm_loss_sum: torch.Tensor | None = None  # position t predicts targets[t + 1]
    mtp_loss_sums: list[torch.Tensor] | None = None  # per depth d: position t predicts targets[t + 1 + d]
    mtp_correct: int = 0  # depth 1: predictions equal to their target
    mtp_counted: int = 0  # depth 1: predictions with a target


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); the MLP is dense or MoE."""

    def __init__(self, cfg: GLM5Config, layer_idx: int, has_indexer: bool | None = None, moe: bool | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        if has_indexer is None:
            has_indexer = cfg.has_indexer(layer_idx)
        if moe is None:
            moe = cfg.is_moe_layer(layer_idx)
        self.self_attn = MLAttention(cfg, has_indexer=has_indexer)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, q_positions, prev_topk=None, key_mask=None):
        attn_out, topk = self.self_attn(self.input_layernorm(x), cos, sin, q_positions, prev_topk, key_mask)
        # inference: add into the sublayers' fresh outputs (see no_autograd), only where their dtype is the sum's
        # (under autocast they are bf16 while the residual stream stays fp32: x + bf16 -> fp32)
        if no_autograd(x, attn_out) and attn_out.dtype == torch.result_type(attn_out, x):
            x = attn_out.add_(x)
            mlp_out = self.mlp(self.post_attention_layernorm(x))
            return (mlp_out.add_(x) if mlp_out.dtype == torch.result_type(mlp_out, x) else x + mlp_out), topk
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, topk


class SharedHeadNorm(nn.Module):
    """`shared_head` of an MTP layer: its own final norm; the output projection is the main lm_head."""

    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """Multi-token prediction (DeepSeek-V3 layout): combine the main model's hidden state at t with the
    embedding of token t+1, run one more decoder layer, predict token t+2 with the shared head."""

    def __init__(self, cfg: GLM5Config, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, has_indexer=True, moe=layer_idx >= cfg.first_k_dense_replace)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHeadNorm(cfg)

    def forward(self, hidden, next_embeds, cos, sin, q_positions, key_mask=None):
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        x, _ = super().forward(x, cos, sin, q_positions, None, key_mask)
        return self.shared_head.norm(x)


class GLM5Model(nn.Module):
    """Embedding -> decoder layers -> final norm (transformers' `model.` prefix)."""

    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        """-> final-normed hidden [B, T, hidden], the per-layer top-k, (cos, sin), position ids."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        q_positions = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)
        topk, all_topk = None, []
        for layer in self.layers:
            x, topk = layer(x, cos, sin, q_positions, topk, attention_mask)
            all_topk.append(topk)
        return self.norm(x), all_topk, (cos, sin), q_positions


class GLM5ForCausalLM(nn.Module):
    def __init__(self, cfg: GLM5Config, attn_impl: str = "sparse") -> None:
        super().__init__()
        self.config = cfg
        self.model = GLM5Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList([MTPLayer(cfg, L + i) for i in range(cfg.num_nextn_predict_layers)])
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.set_attn_impl(attn_impl)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ switches
    def set_attn_impl(self, impl: str) -> GLM5ForCausalLM:
        """"sparse" (default: gathered top-k, absorbed MQA over the latent) or "reference" (dense mask)."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={impl!r}: must be one of {ATTN_IMPLS}")
        for module in self.modules():
            if isinstance(module, MLAttention):
                module.attn_impl = impl
        self.attn_impl = impl
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif hasattr(module, "e_score_correction_bias"):  # Router
                nn.init.normal_(module.weight, std=std)
                module.e_score_correction_bias.zero_()
            elif hasattr(module, "gate_up_proj"):  # Experts
                nn.init.normal_(module.gate_up_proj, std=std)
                nn.init.normal_(module.down_proj, std=std)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_mtp: bool = False,
        targets: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> CausalLMOutput:
        """input_ids [B, T]; labels [B, T] are the input ids themselves (shifted inside, -100 ignored),
        attention_mask [B, T] marks real tokens (1) vs padding (0).

        targets [B, T] (the training path): labels in the same convention, for which the output carries summed
        losses (`lm_loss_sum`, and with return_mtp `mtp_loss_sums`, `mtp_correct`, `mtp_counted`) instead of
        logits, computed chunk by chunk without a [B, T, vocab] tensor (glm5.model.loss).

        logits_to_keep (as transformers'): N > 0 keeps the logits of the last N positions, a 1-D tensor those
        positions; the LM head runs on those rows only (RL's log-probs need the response's, not the prompt's)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(f"targets must match input_ids {tuple(input_ids.shape)}, got {tuple(targets.shape)}")
        hidden, topk, (cos, sin), q_positions = self.model(input_ids, position_ids, attention_mask)
        lm_loss_sum = None
        if targets is not None:
            lm_loss_sum, _ = self._head_loss(hidden, next_token_targets(targets))
            logits = None
        elif isinstance(logits_to_keep, torch.Tensor):
            logits = self.lm_head(hidden[:, logits_to_keep])
        else:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            if logits is None:
                raise ValueError("pass labels (a mean loss over logits) or targets (summed losses), not both")
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        mtp_logits, mtp_sums, mtp_correct, mtp_counted = None, None, 0, 0
        if return_mtp and len(self.mtp):
            mtp_logits = []
            h = hidden
            valid = None if attention_mask is None else attention_mask.bool()
            for depth, layer in enumerate(self.mtp, start=1):
                T = h.shape[1] - 1
                if T < 1:
                    break
                next_embeds = self.model.embed_tokens(input_ids[:, depth : depth + T])
                if valid is not None:  # position t is real only if h[t] and token t + depth both are (left padding)
                    valid = valid[:, :T] & attention_mask[:, depth : depth + T].bool()
                h = layer(h[:, :T], next_embeds, cos[:, :T], sin[:, :T], q_positions[:, :T], valid)
                if targets is None:
                    mtp_logits.append(self.lm_head(h))
                    continue
                usable = targets.shape[1] - 1 - depth  # position t < usable has a target t + 1 + depth
                if usable < 1:
                    break
                depth_targets = targets[:, 1 + depth :]
                total, correct = self._head_loss(h[:, :usable], depth_targets, count_correct=depth == 1)
                mtp_sums = (mtp_sums or []) + [total]
                if depth == 1:
                    mtp_correct, mtp_counted = correct, int((depth_targets != IGNORE_INDEX).sum())
            if targets is not None:
                mtp_logits = None
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=hidden, mtp_logits=mtp_logits, topk_indices=topk,
                              lm_loss_sum=lm_loss_sum, mtp_loss_sums=mtp_sums, mtp_correct=mtp_correct,
                              mtp_counted=mtp_counted)

    def _head_loss(self, hidden: torch.Tensor, targets: torch.Tensor, count_correct: bool = False) -> tuple[torch.Tensor, int]:
        """Summed CE of lm_head(hidden) [B, S, vocab] against targets [B, S] (-100 = none): fused from the
        hidden states for a plain fp32 head, else through the head's logits (FP8 heads, bf16, autocast)."""
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None:
            return linear_cross_entropy(hidden, self.lm_head.weight, targets, count_correct)
        return cross_entropy_sum(self.lm_head(hidden), targets, count_correct)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        attn_impl: str = "sparse", strict: bool = True,
    ) -> GLM5ForCausalLM:
        """Load a Hugging Face directory (ours, or transformers' GlmMoeDsaForCausalLM.save_pretrained); a quantized
        one (config.json's quantization_config: fp8, glm5-int4 / q2mix / ternary) through
        glm5.quant.load.load_any_checkpoint, its quantized modules in place."""
        from glm5.checkpoint import load_pretrained
        from glm5.quant.load import load_any_checkpoint, quant_method

        if cls is GLM5ForCausalLM and quant_method(directory) is not None:
            return load_any_checkpoint(os.fspath(directory), device=device, dtype=dtype, attn_impl=attn_impl)
        return load_pretrained(cls, directory, device=device, dtype=dtype, attn_impl=attn_impl, strict=strict)

    def save_pretrained(self, directory: str | os.PathLike, *, max_shard_size: int = 2 << 30) -> str:
        """Write config.json + sharded safetensors in transformers' key names (per-expert keys, MTP as the
        layer after the last one). Written to a temporary folder first, then moved into place."""
        from glm5.checkpoint import save_pretrained

        return save_pretrained(self, directory, max_shard_size=max_shard_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
