"""Model internals: gradients, the indexer's isolation from the LM loss, grouped MoE vs the plain loop,
block-wise top-k vs the full-matrix top-k, torch.compile."""

import pytest
import torch
from conftest import randomize_, tiny_config

from glm5 import GLM5ForCausalLM
from glm5.kernels import use_cpu_kernels
from glm5.model.experts import experts_reference
from glm5.model.indexer import select_topk_blockwise, select_topk_reference


def test_every_trainable_parameter_gets_a_gradient_except_the_indexer():
    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=8)), std=0.05).train()
    ids = torch.randint(0, 256, (2, 24))
    out = model(ids, labels=ids, return_mtp=True)
    mtp_loss = torch.nn.functional.cross_entropy(out.mtp_logits[0][:, :-1].flatten(0, 1), ids[:, 2:].flatten())
    (out.loss + mtp_loss).backward()
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert p.grad is None, f"{name}: the indexer must get no gradient from the LM loss"
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"


@pytest.mark.parametrize("impl", ["reference", "sparse"])
def test_gradients_of_both_paths_agree(impl):
    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=8)), std=0.05)
    ids = torch.randint(0, 256, (2, 24))
    grads = {}
    for which in ("reference", impl):
        model.zero_grad()
        model.set_attn_impl(which)(ids, labels=ids).loss.backward()
        grads[which] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name, g in grads["reference"].items():
        err = (grads[impl][name] - g).abs().max().item()
        assert err < 1e-5, f"{name}: gradient differs by {err:.2e}"


def _routed_moe(rows: int, dtype: torch.dtype = torch.float32):
    """A 16-expert top-4 MoE layer with random weights, `rows` random tokens and their routing (no grad)."""
    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(n_routed_experts=16, num_experts_per_tok=4))).to(dtype)
    moe = model.model.layers[1].mlp
    x = torch.randn(rows, 64, dtype=dtype)
    with torch.no_grad():
        _, weights, indices = moe.gate(x)
    return moe, x, weights.to(dtype), indices


def test_grouped_moe_equals_the_per_expert_loop():
    moe, x, weights, indices = _routed_moe(50)
    with torch.no_grad():
        grouped = moe.experts(x, indices, weights)
        loop = experts_reference(moe.experts, x, indices, weights)
    assert (grouped - loop).abs().max() < 1e-6


def test_padded_expert_groups_give_the_same_output_and_gradients(monkeypatch):
    """CPU bf16 pads each expert's rows to PAD_ROWS (oneDNN JIT per shape); forced on in fp64 it must change
    nothing: pad rows read token 0 with weight 0, so outputs and every gradient stay the loop's."""
    import glm5.model.experts as experts_mod

    moe, x, weights, indices = _routed_moe(50, torch.float64)
    results = {}
    for pad in (False, True):
        monkeypatch.setattr(experts_mod, "PAD_ROWS", 8)
        xi = x.clone().requires_grad_()
        wi = weights.clone().requires_grad_()
        moe.experts.zero_grad()
        out = moe.experts(xi, indices, wi, path="padded_loop" if pad else "loop")
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        results[pad] = (out.detach(), xi.grad, wi.grad, moe.experts.gate_up_proj.grad.clone(),
                        moe.experts.down_proj.grad.clone())
    for a, b in zip(results[False], results[True]):
        assert (a - b).abs().max() < 1e-12
    loop = experts_reference(moe.experts, x, indices, weights)
    assert (results[True][0] - loop).abs().max() < 1e-12


def test_padded_counts_are_powers_of_two_then_multiples():
    from glm5.model.experts import PAD_ROWS, _padded_counts

    counts = torch.tensor([0, 1, 2, 3, 5, 64, 65, PAD_ROWS, PAD_ROWS + 1, 3 * PAD_ROWS - 7])
    assert _padded_counts(counts).tolist() == [0, 1, 2, 4, 8, 64, 128, PAD_ROWS, 2 * PAD_ROWS, 3 * PAD_ROWS]


def test_expert_padding_is_on_only_for_low_precision_cpu_matmuls():
    from glm5.model.experts import _pad_expert_rows

    x = torch.zeros(4, 8)
    assert not _pad_expert_rows(x)
    assert _pad_expert_rows(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _pad_expert_rows(x)


def test_bf16_autocast_experts_match_fp32_loosely():
    moe, x, weights, indices = _routed_moe(300)  # the same routing for both (bf16 scores may flip near-ties)
    with torch.no_grad():
        ref = moe.experts(x, indices, weights)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = moe.experts(x, indices, weights)
    assert low.dtype == torch.float32 and ((low - ref).norm() / ref.norm()) < 2e-2


def test_router_bias_changes_selection_but_not_weights():
    torch.manual_seed(0)
    moe = randomize_(GLM5ForCausalLM(tiny_config())).model.layers[1].mlp
    x = torch.randn(20, 64)
    with torch.no_grad():
        scores, w0, i0 = moe.gate(x)
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.e_score_correction_bias[3] = 10.0  # expert 3 now always chosen
        _, w1, i1 = moe.gate(x)
    assert (i1 == 3).any(dim=-1).all()
    # weights are the unbiased sigmoid scores of the chosen experts, normalized, times the scaling factor
    chosen = scores.gather(1, i1)
    expected = chosen / chosen.sum(-1, keepdim=True) * moe.gate.routed_scaling_factor
    assert torch.allclose(w1, expected)


@pytest.mark.parametrize("batch,seq,block", [(1, 70, 7), (3, 40, 16), (2, 33, 1)])
def test_blockwise_topk_selects_the_same_tokens_as_the_full_matrix(batch, seq, block):
    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=12)))
    attn = model.model.layers[0].self_attn
    x = torch.randn(batch, seq, 64)
    cos, sin = model.model.rotary_emb(torch.arange(seq).expand(batch, seq), x.dtype)
    pos = torch.arange(seq).expand(batch, seq)
    with torch.no_grad():
        _, _, q_resid = attn.project_q(x, cos, sin)
        q, w = attn.indexer.queries(x, q_resid, cos, sin)
        k = attn.indexer.keys(x, cos, sin)
        w, topk = w * attn.indexer.softmax_scale, attn.indexer.index_topk
        full = select_topk_reference(q, w, k, topk, pos)
        blocks = select_topk_blockwise(q, w, k, topk, pos, block=block)
    for t in range(seq):
        for b in range(batch):
            want = {int(i) for i in full[b, t] if i <= t}
            got = {int(i) for i in blocks[b, t] if i >= 0}
            assert got == want, f"batch {b} query {t}: {sorted(got ^ want)} differ"


def test_padding_mask_hides_padded_keys():
    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=8))).eval()
    ids = torch.randint(0, 256, (1, 20))
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, 3] = 0  # key 3 is padding
    other = ids.clone()
    other[0, 3] = (other[0, 3] + 7) % 256
    for impl in ("reference", "sparse"):
        model.set_attn_impl(impl)
        with torch.no_grad():
            a = model(ids, attention_mask=mask).logits
            b = model(other, attention_mask=mask).logits
        # every position after the pad ignores what token sits there
        assert torch.allclose(a[0, 4:], b[0, 4:], atol=1e-5), impl


@pytest.mark.slow
def test_torch_compile_gives_the_same_logits():
    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=8))).eval()
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model)
        out = compiled(ids).logits
    assert (out - eager).abs().max() < 1e-4


@pytest.mark.parametrize("impl", ["reference", "sparse"])
def test_mtp_logits_under_left_padding_ignore_the_pad_tokens(impl):
    """MTP position t pairs h[t] with token t + 1: with left padding, the last pad position pairs a pad's hidden
    state with a real token and must stay masked, so real positions do not depend on what the pads are."""
    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=64)), seed=0).eval().set_attn_impl(impl)
    T, pad = 20, 6
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, T, dtype=torch.long)
    mask[0, :pad] = 0
    other = ids.clone()
    other[0, :pad] = (other[0, :pad] + 17) % 256
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, position_ids=positions, return_mtp=True)
        b = model(other, attention_mask=mask, position_ids=positions, return_mtp=True)
        alone = model(ids[:, pad:], return_mtp=True)
    assert (a.mtp_logits[0] - b.mtp_logits[0])[0, pad:].abs().max() < 1e-5
    assert (a.mtp_logits[0][0, pad:] - alone.mtp_logits[0][0]).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_in_place_ops_give_the_autograd_numbers(dtype):
    """Under no_grad the MLP, the experts and the residual adds overwrite their fresh outputs in place
    (glm5.model.layers.no_autograd); the numbers must be those of the out-of-place autograd path, bit for bit."""
    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=8))).to(dtype).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with use_cpu_kernels(False):  # the sparse-attention kernel serves no_grad only: compare like with like
        with_grad = model(ids, return_mtp=True)
        assert with_grad.logits.requires_grad
        with torch.no_grad():
            without = model(ids, return_mtp=True)
    assert torch.equal(with_grad.logits.detach(), without.logits)
    assert torch.equal(with_grad.mtp_logits[0].detach(), without.mtp_logits[0])
    # a leaf input that needs no gradient is still never written
    x = torch.randn(2, 24, 64, dtype=dtype)
    before = x.clone()
    layer = model.model.layers[-1]
    cos, sin = model.model.rotary_emb(torch.arange(24).expand(2, 24), dtype)
    with torch.no_grad():
        layer(x, cos, sin, torch.arange(24).expand(2, 24))
    assert torch.equal(x, before)


def test_rope_complex_fast_path_equals_the_real_products():
    """fp32 CPU RoPE runs as one complex multiply when the layout allows a complex view; its values and
    gradients equal the four-product form (the bf16 / odd-offset path), forward and backward."""
    from glm5.model.layers import apply_rope_interleaved

    g = torch.Generator().manual_seed(0)
    cos, sin = torch.randn(2, 7, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    for base, cut in ((torch.randn(2, 7, 3, 80, generator=g), slice(64, 80)),   # a split view, even offset
                      (torch.randn(2, 7, 3, 21, generator=g), slice(1, 17))):   # odd offset: real products
        fast_in = base[..., cut].clone().requires_grad_() if cut.start % 2 else base[..., cut].detach().requires_grad_()
        slow_in = base[..., cut].detach().double().requires_grad_()
        fast = apply_rope_interleaved(fast_in, cos, sin)
        slow = apply_rope_interleaved(slow_in, cos.double(), sin.double())  # fp64: the plain products
        grad = torch.randn(fast.shape, generator=g)
        fast.backward(grad)
        slow.backward(grad.double())
        assert (fast.double() - slow).abs().max() < 1e-5 and (fast_in.grad.double() - slow_in.grad).abs().max() < 1e-5


def test_inference_under_bf16_autocast_keeps_the_fp32_residual_stream():
    """Under autocast the sublayers return bf16 while the residual stream is fp32: the in-place inference adds
    must not round the stream to bf16 (no_grad and grad forwards give the same numbers)."""
    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=8))).eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_grad = model(ids).hidden_states.detach()
        with torch.no_grad():
            without = model(ids).hidden_states
    assert with_grad.dtype == without.dtype == torch.float32
    assert torch.equal(with_grad, without)


@pytest.mark.parametrize("sparse_as_mask", [False, True])
def test_masked_latent_attention_switch_gives_the_sdpa_numbers(monkeypatch, sparse_as_mask):
    """USE_MASKED_LATENT_ATTENTION (the CPU's query-blocked MQA over the latent) off runs SDPA on per-head
    copies: the same loss and gradients within fp32 rounding, for dense attention (T <= index_topk) and for the
    top-k applied as a mask (training's sparse stages; kernels off so the mask path runs)."""
    import glm5.model.mla as mla

    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=64 if not sparse_as_mask else 8)), std=0.05)
    for module in model.modules():
        if isinstance(module, mla.MLAttention):
            module.sparse_as_mask = sparse_as_mask
    ids = torch.randint(0, 256, (2, 24))
    results = {}
    original = mla.masked_latent_attention
    with use_cpu_kernels(False):
        for on in (True, False):
            monkeypatch.setattr(mla, "USE_MASKED_LATENT_ATTENTION", on)
            calls = []
            monkeypatch.setattr(mla, "masked_latent_attention",
                                lambda *a, _calls=calls, **k: _calls.append(1) or original(*a, **k))
            model.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            assert bool(calls) == on, f"switch {on}: the masked path ran {len(calls)} times"
            results[on] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert (results[True][0] - results[False][0]).abs() < 1e-5
    for name, g in results[False][1].items():
        err = (results[True][1][name] - g).abs().max().item()
        assert err < 1e-5, f"{name}: gradient differs by {err:.2e} between the masked path and SDPA"
