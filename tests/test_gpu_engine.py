"""The engine on CUDA: the same greedy tokens as on the CPU, with and without MTP speculation, and sampling
that runs. Skipped without CUDA (conftest)."""

import pytest
import torch
from conftest import randomize_, tiny_config

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


def test_cuda_engine_samples_with_a_seed():
    engine = LLM(_model().cuda())
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=7, ignore_eos=True)
    a = engine.generate([[1, 2, 3]], params)[0].token_ids
    b = engine.generate([[1, 2, 3]], params)[0].token_ids
    assert a == b and len(a) == 12
