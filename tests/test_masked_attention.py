"""masked_latent_attention (the CPU training path of MLA's latent attention) = SDPA on per-head latent copies."""

import pytest
import torch
import torch.nn.functional as F

from glm5.model.masked_attention import masked_latent_attention


def sdpa_reference(q, kv, allowed, scale, latent):
    B, S, H, D = q.shape
    T = kv.shape[1]
    k = kv.unsqueeze(1).expand(B, H, T, D)
    v = kv[..., :latent].unsqueeze(1).expand(B, H, T, latent)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=allowed.unsqueeze(1), scale=scale)
    return torch.nan_to_num(out, nan=0.0).transpose(1, 2)


def make_case(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, S, H, L, R = 2, 40, 3, 16, 4
    T = S if kind != "chunk" else 56
    q = torch.randn(B, S, H, L + R, generator=g, dtype=torch.float64)
    kv = torch.randn(B, T, L + R, generator=g, dtype=torch.float64)
    positions = torch.arange(T - S, T)
    allowed = (torch.arange(T).view(1, -1) <= positions.view(-1, 1)).expand(B, S, T).clone()
    if kind == "topk":
        allowed &= torch.rand(B, S, T, generator=g) < 0.3
    if kind == "padding":  # left padding in row 0: its first 5 queries see no key at all
        allowed[0, :, :5] = False
    return q, kv, allowed, L


@pytest.mark.parametrize("kind", ["causal", "topk", "padding", "chunk"])
@pytest.mark.parametrize("block", [7, 128])
@pytest.mark.parametrize("bounded", [False, True])
def test_forward_and_gradients_match_sdpa(kind, block, bounded):
    q, kv, allowed, L = make_case(kind)
    T, S = kv.shape[1], q.shape[1]
    key_ends = torch.arange(T - S, T) + 1 if bounded else None  # each query's position + 1
    weights = torch.randn(q.shape[0], q.shape[1], q.shape[2], L, dtype=torch.float64)
    grads = []
    for fn in (lambda a, b: sdpa_reference(a, b, allowed, 0.3, L),
               lambda a, b: masked_latent_attention(a, b, allowed, 0.3, L, block=block, key_ends=key_ends)):
        a, b = q.clone().requires_grad_(), kv.clone().requires_grad_()
        out = fn(a, b)
        (out * weights).sum().backward()
        grads.append((out.detach(), a.grad, b.grad))
    for ref, ours in zip(*grads):
        assert torch.allclose(ref, ours, atol=1e-10, rtol=1e-9), (ref - ours).abs().max()
    if kind == "padding":
        assert grads[1][0][0, :5].abs().max() == 0  # rows with no key give 0, not NaN


def test_gradcheck():
    q, kv, allowed, L = make_case("topk", seed=1)
    q, kv = q[:1, :9].clone().requires_grad_(), kv[:1, :9].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: masked_latent_attention(a, b, allowed[:1, :9, :9], 0.5, L, block=4), (q, kv))


def test_bad_mask_is_a_clear_error():
    q, kv, allowed, L = make_case("causal")
    with pytest.raises(ValueError, match="bool"):
        masked_latent_attention(q, kv, allowed.float(), 0.3, L)


def test_bf16_autocast_close_to_fp32():
    q, kv, allowed, L = make_case("topk")
    q, kv = q.float().requires_grad_(), kv.float().requires_grad_()
    ref = masked_latent_attention(q, kv, allowed, 0.3, L)
    ref.sum().backward()
    ref_grads = q.grad.clone(), kv.grad.clone()
    q.grad = kv.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_latent_attention(q, kv, allowed, 0.3, L)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert (out.float() - ref).abs().max() < 0.05
    for ours, theirs in zip((q.grad, kv.grad), ref_grads):
        assert ours.dtype == torch.float32
        assert (ours - theirs).abs().max() / theirs.abs().max() < 0.05
