"""Engine accounting under pressure (each test failed before its fix): MTP drafts under cache pressure,
cached-token counts after preemption, prefix-cache statistics, request ids, and generate() on a bad prompt."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_difference, randomize_, tiny_config

from glm5 import GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams


def make_model(seed=0):
    torch.manual_seed(seed)
    return randomize_(GLM5ForCausalLM(tiny_config(index_n_heads=16)), seed=seed).eval()


def prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("cycles", [False, True], ids=["eager", "static-cycle"])
def test_drafting_under_cache_pressure_does_not_crash_a_step(cycles):
    model = make_model()
    batch = prompts((6, 6), seed=1)
    plain = [c.token_ids for c in LLM(model, block_size=4).generate(batch, greedy(4))]
    # 5 blocks of 4: both sequences can each take one more block for their drafts, but not both at once
    # (cycles: the speculative cycle in its static form, the one compiled steps and CUDA graphs run)
    llm = LLM(model, block_size=4, kv_cache_tokens=20, num_speculative_tokens=1, cuda_graphs=cycles)
    for prompt, c, want in zip(batch, llm.generate(batch, greedy(4)), plain):
        # (the static form pads its batch: other matmul shapes, so a near tie may round the other way)
        assert (differ := greedy_difference(model, prompt, c.token_ids, want)) is None, differ
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_speculative_cycles_through_preemption_give_the_plain_tokens():
    # 12 blocks of 4 for 4 x (5 + 30) tokens and the drafts' room: sequences are preempted and recomputed while
    # the others go on in speculative cycles; a recomputed sequence drafts again after its prefill
    batch = prompts((5, 5, 5, 5), seed=3)
    model = make_model()
    plain = [c.token_ids for c in LLM(model, block_size=4).generate(batch, greedy(30))]
    llm = LLM(model, block_size=4, kv_cache_tokens=48, num_speculative_tokens=2, cuda_graphs=True)
    for prompt, c, want in zip(batch, llm.generate(batch, greedy(30)), plain):
        assert (differ := greedy_difference(model, prompt, c.token_ids, want)) is None, differ
    assert llm.stats.preemptions > 0 and llm.graphs.num_cycles > 0
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_cached_tokens_never_exceed_the_prompt_after_preemption():
    llm = LLM(make_model(), block_size=4, kv_cache_tokens=48)  # 12 blocks: not enough for 4 x (5 + 30) tokens
    for i, p in enumerate(prompts((5, 5, 5, 5), seed=3)):
        llm.add_request(p, greedy(30), request_id=f"r{i}")
    finished = []
    while llm.has_unfinished():
        finished += [o for o in llm.step() if o.finished]
    assert llm.stats.preemptions > 0
    assert len(finished) == 4 and all(o.num_cached_tokens <= o.num_prompt_tokens for o in finished)


def test_prefix_statistics_count_admissions_not_lookups():
    llm = LLM(make_model(), block_size=4, kv_cache_tokens=40)  # 10 blocks
    shared = prompts((16,), seed=1)[0]
    llm.generate([shared + [1]], greedy(1))  # 4 full blocks now in the prefix cache
    bm = llm.block_manager
    hits, queries = bm.prefix_hits, bm.prefix_queries
    a = llm.add_request(prompts((20,), seed=2)[0], greedy(16))  # holds blocks while it decodes
    llm.step()
    b = llm.add_request(shared + list(range(2, 18)), greedy(1))  # 32 tokens: waits for room for several steps
    while llm.has_unfinished():
        llm.step()
    assert b.num_cached_prefix_tokens > 0  # (what eviction left of the shared prefix)
    assert bm.prefix_hits - hits == a.num_cached_prefix_tokens + b.num_cached_prefix_tokens
    assert bm.prefix_queries - queries == a.num_prompt_tokens + b.num_prompt_tokens


def test_automatic_request_ids_do_not_collide_with_numeric_ones():
    llm = LLM(make_model(), block_size=4)
    for i in range(4):
        llm.add_request([1, 2, 3], greedy(2), request_id=str(i + 1000))
    ids = [c.request_id for c in llm.generate([[4, 5, 6], [7, 8, 9]], greedy(2))]
    assert len(set(ids)) == 2 and not any(i.isdigit() for i in ids)


def test_generate_with_a_bad_prompt_queues_nothing():
    llm = LLM(make_model(), block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="at most"):
        llm.generate([[1, 2, 3], list(range(40))], greedy(8))
    assert llm.num_waiting == 0 and llm.num_running == 0 and not llm.requests


def test_accept_length_counts_only_the_drafts_kept():
    """Perfect drafts (the greedy continuation itself) with max_tokens cutting the last verify step short: the
    accepted count must be the drafts actually emitted, so that verify steps + accepted = the tokens they gave."""
    model = make_model()
    prompt = prompts((7,), seed=4)[0]
    reference = LLM(model, block_size=4).generate([prompt], greedy(6))[0].token_ids
    full = prompt + reference
    llm = LLM(model, block_size=4, num_speculative_tokens=3)
    drafter_step = llm.drafter.after_step

    def perfect(*args):
        drafter_step(*args)
        for seq in llm.scheduler.running:
            if seq.draft_token_ids:
                n = len(seq.token_ids)
                seq.draft_token_ids = (full[n : n + 3] + [0, 0, 0])[:3]

    llm.drafter.after_step = perfect
    assert llm.generate([prompt], greedy(6))[0].token_ids == reference
    stats = llm.stats
    assert stats.accepted > 0 and stats.verify_steps + stats.accepted == stats.decode_tokens == 5
