"""An FP8 GLM-5 runs: in-memory conversion, save (glm5 quantize fp8) -> load, dequant vs real FP8 compute, CUDA.

    .venv/bin/python -m pytest -q tests/test_fp8_model.py          # CPU
    .venv/bin/python -m pytest -q -m gpu tests/test_fp8_model.py   # the CUDA checks (need a GPU)
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from glm5.quant.fp8 import (
    FP8_COMPUTE_RTOL,
    FP8_DTYPE,
    FP8Experts,
    FP8Linear,
    dequantize_fp8_blockwise,
    fp8_weight_bytes,
    last_fp8_matmul_path,
    load_fp8_model,
    quantize_model_fp8,
    set_fp8_compute,
)

pytest.importorskip("glm5.model.transformer")
from glm5 import GLM5Config  # noqa: E402
from glm5.model.transformer import GLM5ForCausalLM  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def tiny():
    """tiny-bench (hidden 256, 16 experts of 256, MTP): whole 128-blocks, so the FP8 matmul path applies."""
    torch.manual_seed(0)
    model = GLM5ForCausalLM(GLM5Config.from_preset("tiny-bench")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 80))
    return model, ids


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    from glm5.quant.convert import quantize_checkpoint_fp8

    model, _ = tiny
    root = tmp_path_factory.mktemp("fp8model")
    model.save_pretrained(str(root / "bf16"))
    quantize_checkpoint_fp8(str(root / "bf16"), str(root / "fp8"))
    return str(root / "fp8")


def test_quantize_model_replaces_linears_and_experts_but_keeps_the_bf16_list(tiny):
    model, _ = tiny
    q = quantize_model_fp8(copy.deepcopy(model))
    layer = q.model.layers[3]
    assert isinstance(layer.self_attn.q_a_proj, FP8Linear) and isinstance(layer.mlp.shared_experts.up_proj, FP8Linear)
    assert isinstance(layer.self_attn.indexer.wq_b, FP8Linear)
    assert isinstance(layer.mlp.experts, FP8Experts) and layer.mlp.experts.gate_up_proj.dtype == FP8_DTYPE
    assert isinstance(q.mtp[0].mlp.experts, FP8Experts)
    for kept in (q.lm_head, layer.self_attn.indexer.weights_proj, q.mtp[0].eh_proj, layer.self_attn.kv_b_proj):
        assert type(kept) is nn.Linear, f"{kept} should stay a plain nn.Linear"
    assert q.model.embed_tokens.weight.dtype == torch.float32 and layer.mlp.gate.weight.dtype == torch.float32
    assert q.config.extra["quantization_config"]["quant_method"] == "fp8"
    full, small = fp8_weight_bytes(model), fp8_weight_bytes(q)
    assert small < 0.4 * full, f"fp32 {full} B -> fp8 {small} B"


def test_fp8_experts_equal_the_dequantized_fused_experts(tiny):
    from glm5.model.experts import experts_reference

    model, _ = tiny
    experts = model.model.layers[3].mlp.experts
    fp8 = FP8Experts.from_experts(experts)
    reference = copy.deepcopy(experts)
    inter = experts.gate_up_proj.shape[1] // 2
    with torch.no_grad():
        for e in range(experts.num_experts):
            reference.gate_up_proj[e], reference.down_proj[e] = fp8.expert_weights(e, torch.float32)
    torch.manual_seed(3)
    x = torch.randn(40, experts.gate_up_proj.shape[2])
    indices = torch.stack([torch.randperm(experts.num_experts)[:4] for _ in range(40)])
    weights = torch.rand(40, 4)
    expected = experts_reference(reference, x, indices, weights)
    got = fp8(x, indices, weights)
    assert (got - expected).abs().max().item() < 1e-5, f"max diff {(got - expected).abs().max().item():.3g}"
    # and the dequantized experts are the original ones within FP8 rounding
    assert _rel(reference.gate_up_proj[:, :inter], experts.gate_up_proj[:, :inter]) < 0.04


def test_save_then_load_gives_the_in_memory_fp8_model_exactly(tiny, saved):
    model, ids = tiny
    loaded = load_fp8_model(saved)
    assert isinstance(loaded.model.layers[3].mlp.experts, FP8Experts)
    assert isinstance(loaded.mtp[0].self_attn.q_b_proj, FP8Linear), "the MTP layer must load as FP8 too"
    in_memory = quantize_model_fp8(copy.deepcopy(model)).eval()
    with torch.no_grad():
        a, b = loaded(ids, return_mtp=True), in_memory(ids, return_mtp=True)
    diff = (a.logits - b.logits).abs().max().item()
    assert diff == 0.0, f"loaded FP8 model differs from the in-memory conversion by {diff:.3g}"
    assert (a.mtp_logits[0] - b.mtp_logits[0]).abs().max().item() == 0.0
    state_a, state_b = loaded.state_dict(), in_memory.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), f"{key} differs after save -> load"


def test_fp8_model_stays_close_to_the_full_precision_one(tiny, saved):
    model, ids = tiny
    loaded = load_fp8_model(saved)
    with torch.no_grad():
        full, fp8 = model(ids, labels=ids), loaded(ids, labels=ids)
    change = abs(math.exp(fp8.loss.item()) / math.exp(full.loss.item()) - 1)
    assert change < 0.01, f"perplexity changed by {change:.2%} under FP8 (random-init model)"


def test_real_fp8_compute_matches_dequant_compute(tiny, saved):
    """Layer by layer within FP8_COMPUTE_RTOL; the whole model's loss within 1%."""
    _, ids = tiny
    model = load_fp8_model(saved)
    linear = model.model.layers[1].self_attn.q_b_proj
    x = torch.randn(3, 17, linear.in_features)
    with torch.no_grad():
        reference = linear(x)
        linear.compute = "fp8"
        got = linear(x)
    assert _rel(got, reference) < FP8_COMPUTE_RTOL, f"FP8Linear fp8 vs dequant: {_rel(got, reference):.4f}"
    assert set_fp8_compute(model, "dequant") > 0
    with torch.no_grad():
        dequant = model(ids, labels=ids).loss.item()
        set_fp8_compute(model, "fp8")
        real = model(ids, labels=ids).loss.item()
    assert last_fp8_matmul_path() in ("blockwise", "rowwise-loop")
    assert abs(real - dequant) / dequant < 0.01, f"loss {dequant:.4f} (dequant) vs {real:.4f} (fp8 matmuls)"


def test_casting_an_fp8_model_keeps_weights_fp8_and_scales_fp32(saved):
    model = load_fp8_model(saved).to(torch.bfloat16)
    experts = model.model.layers[3].mlp.experts
    assert experts.gate_up_proj.dtype == FP8_DTYPE and experts.gate_up_proj_scale_inv.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_a_proj.weight.dtype == FP8_DTYPE
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(torch.randint(0, 100, (1, 12))).logits
    assert torch.isfinite(out).all()


def test_loading_a_directory_without_fp8_config_is_a_clear_error(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no block-wise FP8 quantization_config"):
        load_fp8_model(str(tmp_path))


# ---------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_cuda_fp8_matmul_matches_dequant_for_glm5_shapes():
    """Real FP8 GEMMs (blockwise scaled_mm on Hopper + CUDA >= 12.9, else the row-wise loop) on GLM-5's shapes."""
    from glm5.quant.fp8 import fp8_matmul, quantize_fp8_blockwise

    torch.manual_seed(0)
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        pytest.skip(f"FP8 tensor cores need compute capability >= 8.9, this GPU is {major}.{minor}")
    for n, k, m in ((576, 6144, 7), (2048, 6144, 128), (6144, 2048, 33), (4096, 2048, 1), (28672, 512, 64)):
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        w_fp8, scale_inv = quantize_fp8_blockwise(weight)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        reference = x.float() @ dequantize_fp8_blockwise(w_fp8, scale_inv, dtype=torch.float32).t()
        got = fp8_matmul(x, w_fp8, scale_inv)
        rel = _rel(got, reference)
        print(f"[{m}x{k}] @ [{n}x{k}]^T via {last_fp8_matmul_path()}: rel {rel:.4f}")
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        assert rel < FP8_COMPUTE_RTOL, f"[{m}x{k}]@[{n}x{k}]ᵀ via {last_fp8_matmul_path()}: {rel:.4f} off dequant"


@pytest.mark.gpu
@cuda
def test_cuda_fp8_model_dequant_and_fp8_compute_agree(tiny, saved):
    _, ids = tiny
    model = load_fp8_model(saved, device="cuda", dtype=torch.bfloat16)
    ids = ids.cuda()
    with torch.no_grad():
        dequant = model(ids, labels=ids).loss.item()
        set_fp8_compute(model, "fp8")
        real = model(ids, labels=ids).loss.item()
    print(f"loss dequant {dequant:.4f} fp8 {real:.4f} via {last_fp8_matmul_path()}")
    assert math.isfinite(real) and abs(real - dequant) / dequant < 0.01, f"{dequant:.4f} vs {real:.4f}"
