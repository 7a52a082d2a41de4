"""The routed experts' paths (glm5.model.experts): each one equals transformers' per-expert loop, and the
dispatcher picks the path its table says for each device / dtype / autograd / size / static case; the engine
and the model reach the experts through the same dispatcher."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_config

import glm5.model.experts as experts_module
from glm5 import GLM5ForCausalLM
from glm5.kernels import build, use_cpu_kernels
from glm5.kernels import experts as experts_kernel
from glm5.model.experts import PATHS, experts_path, run_experts


def _moe(rows: int, experts: int = 16, k: int = 4, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_(GLM5ForCausalLM(tiny_config(n_routed_experts=experts, num_experts_per_tok=k))).to(dtype)
    moe = model.model.layers[1].mlp
    x = torch.randn(rows, 64, dtype=dtype)
    with torch.no_grad():
        _, weights, indices = moe.gate(x)
    return moe, x, weights, indices


CPU_PATHS = [p for p in PATHS if p not in ("grouped_mm", "reference")]


@pytest.mark.parametrize("rows", [1, 3, 37])
@pytest.mark.parametrize("path", CPU_PATHS)
def test_every_path_equals_the_reference_loop(path, rows):
    moe, x, weights, indices = _moe(rows)
    want = run_experts(moe.experts, x, indices, weights, path="reference")
    grad = path == "cpu_autograd"  # a training path: it runs with autograd recording
    xi = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        got = run_experts(moe.experts, xi, indices, weights, path=path)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.detach() - want).abs().max().item()
    assert err <= 1e-5 * max(1.0, want.abs().max().item()), f"{path}: differs from the reference by {err:.2e}"


def test_paths_differ_from_a_wrong_answer():
    """The comparison above can fail: dropping one expert's contribution shows up far above the tolerance."""
    moe, x, weights, indices = _moe(37)
    want = run_experts(moe.experts, x, indices, weights, path="reference")
    wrong = run_experts(moe.experts, x, indices, weights.masked_fill(indices == indices[0, 0], 0), path="loop")
    assert (wrong - want).abs().max() > 1e-3


def test_unknown_path_is_refused():
    moe, x, weights, indices = _moe(4)
    with pytest.raises(ValueError, match="experts path"):
        run_experts(moe.experts, x, indices, weights, path="fastest")


def test_dispatcher_follows_the_table(monkeypatch):
    moe, x, weights, indices = _moe(8)
    experts = moe.experts
    small, small_idx, small_w = x[:3], indices[:3], weights[:3]
    with torch.no_grad():
        kernel = "cpu_rows" if experts_kernel.available() else None  # CPU fp32 decode sizes, kernels built
        assert experts_path(experts, x, indices, weights) == (kernel or "loop")  # 8 rows
        assert experts_path(experts, small, small_idx, small_w) == (kernel or "per_token")
        assert experts_path(experts, x, indices, weights, static=True) == (kernel or "dense_all")
        big = x.repeat(3, 1)[: experts_module.CPU_ROWS_MAX_ROWS + 1]  # over the kernel's rows: a matmul's job
        big_idx, big_w = indices.repeat(3, 1)[: len(big)], weights.repeat(3, 1)[: len(big)]
        assert experts_path(experts, big, big_idx, big_w) == "loop"
        with use_cpu_kernels(False):
            assert experts_path(experts, x, indices, weights) == "loop"
            assert experts_path(experts, small, small_idx, small_w) == "per_token"  # decode sizes
            # static (CUDA graphs): 16 experts <= 2 * 8 * 4 -> every expert on every row; 1 row -> gathered
            assert experts_path(experts, x, indices, weights, static=True) == "dense_all"
            assert experts_path(experts, x[:1], indices[:1], weights[:1], static=True) == "gathered"
        monkeypatch.setattr(experts_module, "USE_CPU_ROWS", False)
        assert experts_path(experts, small, small_idx, small_w) == "per_token"
        assert experts_path(experts, x.bfloat16(), indices, weights) == "padded_loop"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert experts_path(experts, x, indices, weights) == "padded_loop"
        monkeypatch.setattr(experts_module, "PAD_EXPERT_ROWS", False)
        assert experts_path(experts, x.bfloat16(), indices, weights) == "loop"
    xg = x.clone().requires_grad_()
    if experts_module._cpu_experts_ok(x, experts.gate_up_proj, experts.down_proj, weights):  # kernels built
        assert experts_path(experts, xg, indices, weights) == "cpu_autograd"
        assert experts_path(experts, xg[:3], small_idx, small_w) == "cpu_autograd"  # training never per_token
    with use_cpu_kernels(False):
        assert experts_path(experts, xg, indices, weights) == "loop"
    monkeypatch.setattr(experts_module, "USE_CPU_EXPERTS", False)
    assert experts_path(experts, xg, indices, weights) == "loop"


def test_engine_and_model_reach_the_experts_through_the_dispatcher(monkeypatch):
    """The engine's MoE step calls the same `run_experts` as the model (no path of its own): with the
    dispatcher recording its calls, a decode step and a prefill both go through it, statically or not."""
    from glm5.engine import LLM, SamplingParams

    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config()), std=0.05)
    seen = []
    original = experts_module.experts_path

    def recording(*args, **kwargs):
        path = original(*args, **kwargs)
        seen.append(path)
        return path

    monkeypatch.setattr(experts_module, "experts_path", recording)
    monkeypatch.setattr(experts_module, "USE_CPU_ROWS", False)  # the decode kernel has its own test below
    for graphs in (False, True):
        seen.clear()
        llm = LLM(model, cuda_graphs=graphs)
        llm.generate([list(range(1, 12))], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        want = {"dense_all", "gathered"} if graphs else {"per_token", "loop"}
        assert set(seen) and set(seen) <= want, f"cuda_graphs={graphs}: paths {sorted(set(seen))}"
        assert "per_token" in seen or graphs, "decode steps (1 row) should take the per-token path"


@pytest.mark.parametrize("isa", build.available_isas())
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_decode_kernel_equals_the_gathered_sums(monkeypatch, isa, rows):
    """glm5.kernels.experts on every instruction-set path this CPU runs (forced), against the same sums in
    PyTorch, with widths that are not whole vectors (the kernel's tails) and rows sharing experts."""
    monkeypatch.setenv(build.ISA_ENV, isa)
    gen = torch.Generator().manual_seed(rows)
    E, H, I, k = 6, 72, 40, 3
    gate_up, down = torch.randn(E, 2 * I, H, generator=gen) * 0.2, torch.randn(E, H, I, generator=gen) * 0.2
    x = torch.randn(rows, H, generator=gen)
    indices = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(rows)])
    weights = torch.rand(rows, k, generator=gen)
    if not experts_kernel.available():
        pytest.skip("no C compiler: the kernel cannot be built")
    assert build.library_isa(build.load_library("experts"))[0] == isa
    got = experts_kernel.experts_rows(x, indices, weights, gate_up, down)
    want = experts_kernel.experts_rows_reference(x, indices, weights, gate_up, down)
    assert got is not None and got.shape == want.shape
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, scale)
    # the comparison can fail: one slot's weight dropped moves the sums far beyond the tolerance
    wrong = experts_kernel.experts_rows(x, indices, weights.masked_fill(indices == indices[0, 0], 0), gate_up, down)
    assert (wrong - want).abs().max().item() > 1e-3 * max(1.0, scale)
    # not CPU fp32: None (the caller's PyTorch path runs)
    assert experts_kernel.experts_rows(x.double(), indices, weights, gate_up, down) is None
