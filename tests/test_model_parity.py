"""Logits parity with transformers' glm_moe_dsa (the oracle), and agreement of our two attention paths."""

import pytest
import torch
from conftest import randomize_, tiny_config, transformers_twin

from glm5 import GLM5ForCausalLM

# Five random tiny configs; each covers something the others do not.
CONFIGS = {
    "long-seq": dict(index_topk=16),  # seq 48 > index_topk: real sparse selection
    "grouped-router": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    "index-share": dict(num_hidden_layers=5, index_topk_freq=2, index_skip_topk_offset=1),
    "no-norm-topk": dict(norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2, first_k_dense_replace=0),
    "yarn-bias": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                    "mscale": 1.0, "mscale_all_dim": 1.0}, attention_bias=True, index_topk=8),
    "short-seq": dict(index_topk=64),  # seq <= index_topk: the sparse path skips the indexer
}


def build(name, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config(**CONFIGS[name])
    return randomize_(GLM5ForCausalLM(cfg).eval(), seed=seed)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl", ["reference", "sparse"])
def test_logits_match_transformers(name, impl):
    ours = build(name)
    ours.set_attn_impl(impl)
    twin = transformers_twin(ours, "eager")
    ids = torch.randint(0, ours.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = twin(ids).logits
        out = ours(ids).logits
    err = (out - ref).abs().max().item()
    assert out.shape == ref.shape == (2, 48, ours.config.vocab_size)
    assert err < 1e-4, f"{name}/{impl}: max |ours - transformers| = {err:.3e} (logit scale {ref.abs().max():.2f})"


def test_index_share_layers_hold_no_indexer_and_reuse_topk():
    ours = build("index-share")
    kinds = ours.config.indexer_types
    assert "shared" in kinds
    for layer, kind in zip(ours.model.layers, kinds):
        assert (layer.self_attn.indexer is None) == (kind == "shared")
    with torch.no_grad():
        out = ours(torch.randint(0, 256, (1, 40)))
    for i, kind in enumerate(kinds):
        if kind == "shared":
            assert torch.equal(out.topk_indices[i], out.topk_indices[i - 1])


@pytest.mark.parametrize("name", ["long-seq", "grouped-router", "index-share", "yarn-bias", "short-seq"])
def test_sparse_and_reference_paths_agree_to_1e5(name):
    ours = build(name)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ours.set_attn_impl("reference")(ids, return_mtp=True)
        sp = ours.set_attn_impl("sparse")(ids, return_mtp=True)
    err = (sp.logits - ref.logits).abs().max().item()
    assert err < 1e-5, f"{name}: max |sparse - reference| = {err:.3e}"
    mtp_err = (sp.mtp_logits[0] - ref.mtp_logits[0]).abs().max().item()
    assert mtp_err < 1e-5, f"{name}: MTP logits differ by {mtp_err:.3e}"


def test_transformers_weights_load_into_ours():
    """transformers -> ours: a state_dict from GlmMoeDsaForCausalLM drops straight in."""
    from transformers import GlmMoeDsaForCausalLM

    from glm5.checkpoint import to_transformers_config

    cfg = tiny_config(index_topk=8)
    torch.manual_seed(5)
    twin = randomize_(GlmMoeDsaForCausalLM(to_transformers_config(cfg, "sdpa")).eval(), seed=5)
    ours = GLM5ForCausalLM(cfg).eval()
    missing, unexpected = ours.load_state_dict(twin.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("mtp.") for k in missing), (missing, unexpected)
    ids = torch.randint(0, 256, (3, 30))
    with torch.no_grad():
        err = (ours(ids).logits - twin(ids).logits).abs().max().item()
    assert err < 1e-4, f"max |ours - transformers(sdpa)| = {err:.3e}"


def test_bf16_runs_and_stays_close_to_fp32_and_to_transformers_bf16():
    # Small weights: with large ones a bf16 rounding flips expert / top-k choices and the comparison is chaos.
    torch.manual_seed(0)
    ours = randomize_(GLM5ForCausalLM(tiny_config(index_topk=64)).eval(), std=0.05)
    twin = transformers_twin(ours, "eager").to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        ref = ours(ids).logits
        theirs = twin(ids).logits.float()
        ours.to(torch.bfloat16)
        assert ours.model.layers[1].mlp.gate.weight.dtype == torch.float32, "router must stay fp32"
        assert ours.model.layers[0].self_attn.indexer.weights_proj.weight.dtype == torch.float32
        for impl in ("reference", "sparse"):
            low = ours.set_attn_impl(impl)(ids).logits
            assert low.dtype == torch.bfloat16
            rel32 = ((low.float() - ref).norm() / ref.norm()).item()
            rel_tf = ((low.float() - theirs).norm() / theirs.norm()).item()
            assert rel32 < 0.03 and rel_tf < 0.03, f"{impl}: bf16 vs fp32 {rel32:.4f}, vs transformers bf16 {rel_tf:.4f}"


def test_mtp_logits_shape_and_dependence_on_next_token():
    ours = build("long-seq")
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        out = ours(ids, return_mtp=True)
        ids2 = ids.clone()
        ids2[:, 10] = (ids2[:, 10] + 1) % 256
        out2 = ours(ids2, return_mtp=True)
    assert out.mtp_logits[0].shape == (2, 19, 256)
    # position 9 of the MTP sees token 10 (t + 1): it must change; positions 0..8 see neither 9's hidden change
    # nor token 10. "Unchanged" is up to fp32 rounding: the MoE groups tokens by expert and the matmuls block by
    # batch content, so the summation order of earlier positions may move with a later token (~1e-6 of the
    # logits' scale on some CPUs); a real causal leak moves logits by O(1).
    before, after = out.mtp_logits[0], out2.mtp_logits[0]
    scale = before.abs().max().item()
    leak = (before[:, :9] - after[:, :9]).abs().max().item()
    assert leak <= 1e-5 * max(scale, 1.0), f"positions 0..8 moved by {leak:.3g} (logit scale {scale:.3g})"
    moved = (before[:, 9] - after[:, 9]).abs().max().item()
    assert moved > 1e-3 * max(scale, 1.0), f"position 9 moved by only {moved:.3g}: MTP does not see token t + 1"


def test_bad_attn_impl_and_bad_input_shape():
    ours = build("short-seq")
    with pytest.raises(ValueError, match="attn_impl"):
        ours.set_attn_impl("flash")
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        ours(torch.zeros(5, dtype=torch.long))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("name", ["long-seq", "no-norm-topk"])
def test_mtp_logits_follow_the_deepseek_v3_mtp_formula(name):
    """DeepSeek-V3 (arXiv:2412.19437, section 2.2) with depth 1, written out here apart from glm5's MTPLayer:
        h'_t = M [RMSNorm(h_t); RMSNorm(Emb(t_{t+1}))]      h_t: the main model's final (normed) hidden state
        h''  = TransformerBlock(h'_{0..T-2})                a causal decoder layer over the shifted sequence
        P_{t+2} = OutHead(RMSNorm(h''_t))                    the main model's lm_head, the MTP layer's own norm
    The paper writes the hidden state first; the released checkpoints' eh_proj takes the embedding half first
    (as vLLM's and SGLang's DeepSeek MTP code read it: cat([enorm(embeds), hnorm(hidden)])), which is M here.
    The block is transformers' GlmMoeDsa decoder layer holding the MTP layer's weights, the outside oracle."""
    from transformers import GlmMoeDsaForCausalLM

    from glm5.checkpoint import to_transformers_config

    ours = build(name)
    cfg = ours.config
    mtp = ours.mtp[0]
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = ours(ids, return_mtp=True)
        h = out.hidden_states[:, :-1]                       # h_t, t = 0 .. T-2
        emb = ours.model.embed_tokens.weight[ids[:, 1:]]    # Emb(t_{t+1})
        eps = cfg.rms_norm_eps
        joined = torch.cat([_rms_norm(emb, mtp.enorm.weight, eps), _rms_norm(h, mtp.hnorm.weight, eps)], dim=-1)
        h_prime = joined @ mtp.eh_proj.weight.T

        # the block: a one-layer transformers model whose layer 0 is the MTP layer's decoder block, whose final
        # norm is the MTP layer's shared_head.norm and whose head is the main lm_head
        block_cfg = cfg.replace(num_hidden_layers=1, num_nextn_predict_layers=0,
                                first_k_dense_replace=0 if cfg.num_hidden_layers >= cfg.first_k_dense_replace else 1)
        twin = GlmMoeDsaForCausalLM(to_transformers_config(block_cfg, "eager")).eval()
        state = {"model.layers.0." + k: v for k, v in mtp.state_dict().items()
                 if not k.startswith(("enorm.", "hnorm.", "eh_proj.", "shared_head."))}
        state["model.norm.weight"] = mtp.shared_head.norm.weight
        state["lm_head.weight"] = ours.lm_head.weight
        state["model.embed_tokens.weight"] = ours.model.embed_tokens.weight
        missing, unexpected = twin.load_state_dict(state, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        expected = twin(inputs_embeds=h_prime).logits       # [B, T-1, vocab]: position t predicts token t + 2
    got = out.mtp_logits[0]
    assert got.shape == expected.shape == (2, 23, cfg.vocab_size)
    # fp32, the same tolerance as the main model's logits against transformers (sums in a different order)
    scale = expected.abs().max().item()
    err = (got - expected).abs().max().item()
    assert err < 1e-4 * max(scale, 1.0), f"{name}: MTP logits differ from the formula by {err:.3e} (scale {scale:.2f})"
