"""Greedy decoding through the engine (paged latent cache, absorbed MLA, sparse DSA decode) is token-identical
to transformers' `generate` on the same weights, and to our own full forward without a cache."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_difference, randomize_, tiny_config, transformers_twin

from glm5 import GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams

NEW_TOKENS = 20
# lengths below, at and above index_topk=16: dense and sparse decode, and prompts that cross over
PROMPT_LENGTHS = (3, 9, 17, 40)


def _model(seed: int = 0, **overrides):
    # 16 indexer heads: exact ties in the top-k (a key scores exactly 0 when all 16 heads' ReLU terms are 0, 1 in
    # 65,536) become vanishingly rare; transformers keeps an arbitrary subset of such ties, glm5 the lowest positions
    torch.manual_seed(seed)
    return randomize_(GLM5ForCausalLM(tiny_config(index_n_heads=16, **overrides)), seed=seed).eval()


def _prompts(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _greedy(n=NEW_TOKENS):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _reference_greedy(model, prompt, n=NEW_TOKENS):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def model_and_twin():
    model = _model()
    return model, transformers_twin(model, "eager")


# cuda_graphs=True on a CPU: the static decode forward that CUDA graphs capture, run eagerly (padded batch and
# context buckets, sync-free tie rule and MoE)
@pytest.mark.parametrize("cuda_graphs", [None, True], ids=["eager", "static"])
def test_greedy_matches_transformers_generate_per_prompt(model_and_twin, cuda_graphs):
    model, twin = model_and_twin
    prompts = _prompts()
    ours = LLM(model, block_size=4, max_num_batched_tokens=32, cuda_graphs=cuda_graphs).generate(prompts, _greedy())
    for prompt, completion in zip(prompts, ours):
        ids = torch.tensor([prompt])  # an explicit mask: inferred from pad_token_id, it would drop any prompt id 0
        out = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        expected = out[0, len(prompt):].tolist()
        differ = greedy_difference(model, prompt, completion.token_ids, expected)
        assert differ is None, f"prompt of {len(prompt)} tokens: {differ}"


@pytest.mark.parametrize("cuda_graphs", [None, True], ids=["eager", "static"])
def test_greedy_matches_transformers_on_a_left_padded_mixed_length_batch(model_and_twin, cuda_graphs):
    model, twin = model_and_twin
    prompts = _prompts(1)
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = twin.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                        do_sample=False, pad_token_id=0)
    ours = LLM(model, block_size=8, cuda_graphs=cuda_graphs).generate(prompts, _greedy())
    for i, (prompt, completion) in enumerate(zip(prompts, ours)):
        expected = out[i, longest:].tolist()
        differ = greedy_difference(model, prompt, completion.token_ids, expected)
        assert differ is None, f"prompt {i} ({len(prompt)} tokens): {differ}"


@pytest.mark.parametrize("cuda_graphs", [None, True], ids=["eager", "static"])
@pytest.mark.parametrize("index_topk_freq", [1, 2])
def test_greedy_matches_full_forward_with_chunked_prefill_and_small_blocks(index_topk_freq, cuda_graphs):
    # freq 2: IndexShare layers reuse the previous layer's top-k; chunks of 7 tokens across blocks of 3
    model = _model(seed=3, index_topk_freq=index_topk_freq, index_skip_topk_offset=1, num_hidden_layers=4)
    prompts = _prompts(2)
    ours = LLM(model, block_size=3, max_num_batched_tokens=7, cuda_graphs=cuda_graphs).generate(prompts, _greedy(12))
    for prompt, completion in zip(prompts, ours):
        expected = _reference_greedy(model, prompt, 12)
        differ = greedy_difference(model, prompt, completion.token_ids, expected)
        assert differ is None, f"{len(prompt)}-token prompt: {differ}"


def test_greedy_difference_forgives_only_a_near_tie():
    model = _model()
    prompt = _prompts()[1]
    expected = _reference_greedy(model, prompt, 4)
    assert greedy_difference(model, prompt, expected, expected) is None
    with torch.no_grad():
        worst = int(model(torch.tensor([prompt])).logits[0, -1].argmin())
    assert "first difference at new token 0" in greedy_difference(model, prompt, [worst] + expected[1:], expected)
