"""The engine on CUDA: the same greedy tokens as on the CPU, with and without MTP speculation (its cycles
captured as CUDA graphs), and sampling that runs. Skipped without CUDA (conftest)."""

import pytest
import torch
from conftest import drafting_model, randomize_, tiny_config

from glm5 import GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def _model():
    torch.manual_seed(0)
    return randomize_(GLM5ForCausalLM(tiny_config(index_n_heads=16)), seed=0).eval()


def test_cuda_engine_greedy_equals_the_cpu_engine():
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    cpu = [c.token_ids for c in LLM(_model()).generate(prompts, greedy)]
    gpu = [c.token_ids for c in LLM(_model().cuda()).generate(prompts, greedy)]
    assert gpu == cpu
    spec = LLM(_model().cuda(), num_speculative_tokens=2).generate(prompts, greedy)
    assert [c.token_ids for c in spec] == cpu


def test_speculative_cycles_are_captured_and_take_the_eager_drafters_drafts():
    model = drafting_model()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cpu = LLM(model, num_speculative_tokens=2)
    want = [c.token_ids for c in cpu.generate(prompts, greedy)]
    llm = LLM(drafting_model().cuda(), num_speculative_tokens=2)  # CUDA graphs on by default, cycles included
    assert [c.token_ids for c in llm.generate(prompts, greedy)] == want
    graphs = llm.graphs
    assert graphs.failed is None and graphs.cycles and all(e.graph is not None for e in graphs.cycles.values())
    assert graphs.num_cycles == llm.stats.steps - 1 and graphs.num_replays >= graphs.num_cycles
    assert (llm.stats.drafted, llm.stats.accepted) == (cpu.stats.drafted, cpu.stats.accepted)


def test_cuda_engine_samples_with_a_seed():
    engine = LLM(_model().cuda())
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=7, ignore_eos=True)
    a = engine.generate([[1, 2, 3]], params)[0].token_ids
    b = engine.generate([[1, 2, 3]], params)[0].token_ids
    assert a == b and len(a) == 12


def test_cuda_graphs_replay_decode_and_match_the_cpu_engine():
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 12, 33)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (24, 9, 16)]
    cpu = [c.token_ids for c in LLM(_model()).generate(prompts, params)]
    llm = LLM(_model().cuda(), max_num_seqs=8)
    llm.graphs.capture(3, 64, 64)  # ahead of time (the prefill, and every decode shape below): the run
    captured = llm.graphs.capture_decode(64)  # below captures nothing new
    gpu = [c.token_ids for c in llm.generate(prompts, params)]
    assert gpu == cpu
    assert len(llm.graphs.entries) == captured and all(e.graph is not None for e in llm.graphs.entries.values())
    assert llm.graphs.num_replays >= 24  # the prefill and every decode step (the batch shrinks 3 -> 2 -> 1)


def test_static_moe_grouped_mm_in_bf16_matches_the_moe():
    from glm5.model.experts import _grouped_mm_ok, experts_path

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    model = _model().cuda().to(torch.bfloat16)
    moe = model.model.layers[1].mlp
    x = torch.randn(8, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    assert _grouped_mm_ok(x)
    with torch.no_grad():
        expected = moe(x.unsqueeze(0))[0].float()
        _, weights, indices = moe.gate(x)
        assert experts_path(moe.experts, x, indices, weights, static=True) == "grouped_mm"
        got = (moe.routed(x, static=True) + moe.shared_experts(x)).float()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2


def test_cuda_graphs_in_bf16_give_the_eager_engine_logits():
    model = _model().cuda().to(torch.bfloat16)
    prompts = [[1, 2, 3, 4, 5], list(range(7, 30))]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    logits = {}
    for name, graphs in (("graphs", True), ("eager", False)):
        llm = LLM(model, cuda_graphs=graphs)
        seen = logits[name] = []
        plain = llm.runner.logits
        llm.runner.logits = lambda h, plain=plain, seen=seen: seen.append(plain(h)) or seen[-1]
        llm.generate(prompts, greedy)
        assert (llm.graphs.num_replays > 0) if graphs else llm.graphs is None
    # one prefill step (the same eager code in both), then decode steps fed the same tokens
    assert len(logits["graphs"]) == len(logits["eager"]) == 4
    for g, e in zip(logits["graphs"][:2], logits["eager"][:2]):
        assert ((g - e).abs().max() / e.abs().max()).item() < 2e-2
