"""The model on CUDA: same numbers as on the CPU, both attention paths, the grouped-matmul MoE fast path.
Skipped without CUDA (conftest)."""

import pytest
import torch
from conftest import randomize_, tiny_config, transformers_twin

from glm5 import GLM5ForCausalLM
from glm5.model.experts import experts_path

pytestmark = pytest.mark.gpu


def test_cuda_logits_match_cpu_and_transformers():
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=16))).eval()
    twin = transformers_twin(model, "eager").cuda()
    ids = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        cpu = model(ids).logits
        model.cuda()
        theirs = twin(ids.cuda()).logits.cpu()
        for impl in ("reference", "sparse"):
            out = model.set_attn_impl(impl)(ids.cuda()).logits.cpu()
            assert (out - cpu).abs().max() < 1e-4, impl
            assert (out - theirs).abs().max() < 1e-4, impl


def test_grouped_mm_moe_matches_the_loop_in_bf16():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(n_routed_experts=16, num_experts_per_tok=4, hidden_size=128,
                                                    moe_intermediate_size=64)), std=0.05)
    experts = model.model.layers[1].mlp.experts.cuda().to(torch.bfloat16)
    gate = model.model.layers[1].mlp.gate.cuda()
    x = torch.randn(300, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        _, w, idx = gate(x)
        assert experts_path(experts, x, idx, w) == "grouped_mm"
        fast = experts(x, idx, w).float()
        slow = experts(x, idx, w, path="reference").float()
    rel = ((fast - slow).norm() / slow.norm()).item()
    assert rel < 1e-2, f"grouped_mm vs loop relative error {rel:.2e}"


def test_cuda_training_step_runs_in_bf16():
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=16)), std=0.05).cuda().to(torch.bfloat16).train()
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    out = model(ids, labels=ids, return_mtp=True)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.layers[1].mlp.experts.gate_up_proj.grad is not None
