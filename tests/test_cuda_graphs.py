"""The static decode forward that CUDA graphs capture (glm5/engine/cuda_graphs.py), checked on the CPU, where
`cuda_graphs=True` runs it uncaptured: sync-free tie rule and MoE against their ordinary forms, buckets, the
padding rows' scratch slot, and the engine's tokens against the eager engine. (On CUDA: tests/test_gpu_engine.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import drafting_model, greedy_difference, randomize_, tiny_config

from glm5 import GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams
from glm5.engine.cuda_graphs import batch_buckets, context_bucket
from glm5.model.indexer import lowest_position_ties, lowest_position_ties_static
from glm5.model.moe import MoE


def _model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return randomize_(GLM5ForCausalLM(tiny_config(**overrides)), seed=seed).eval()


def _prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("seed", range(6))
def test_static_tie_rule_equals_the_ordinary_one(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (5, 3, 40), generator=gen).float()  # integers: ties everywhere
    scores[0, :, 10:] = float("-inf")  # fewer visible keys than k: left alone by both
    scores[1, 1, 5:] = float("-inf")
    k = 12
    values, indices = scores.topk(k, dim=-1)
    expected = lowest_position_ties(scores, values, indices)
    got = lowest_position_ties_static(scores, values, indices)
    assert torch.equal(got, expected)
    assert not torch.equal(expected, indices)  # the rule had work to do


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("groups", [1, 2])
def test_static_moe_equals_the_moe(n, groups):
    model = _model(n_group=groups, topk_group=1)
    moe = next(layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE))
    x = torch.randn(n, model.config.hidden_size, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        expected = moe(x.unsqueeze(0))[0]
        got = moe.routed(x, static=True) + moe.shared_experts(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(33) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert [context_bucket(n) for n in (1, 16, 17, 64, 65, 1000)] == [16, 16, 32, 64, 128, 1024]


def test_static_engine_equals_eager_as_sequences_leave_and_join():
    # different max_tokens: the batch shrinks through the buckets (4 -> 2 -> 1); a late request joins mid-way
    model = _model(index_n_heads=16)
    prompts = _prompts((3, 17, 40, 9))
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (30, 12, 5, 22)]
    eager = [c.token_ids for c in LLM(model, block_size=4).generate(prompts, params)]
    llm = LLM(model, block_size=4, cuda_graphs=True)
    static = [c.token_ids for c in llm.generate(prompts, params)]
    # (the static path pads the batch: other matmul shapes, so a near tie may round the other way)
    for prompt, got, want in zip(prompts, static, eager):
        assert (differ := greedy_difference(model, prompt, got, want)) is None, differ
    shapes = set(llm.graphs.entries)
    assert (4, 64, 64) in shapes  # the prefill: 4 prompts of up to 40 tokens, padded to 64 each
    decode = {shape for shape in shapes if shape[1] == 1}
    assert {s for s, _, _ in decode} == {1, 2, 4} and {t for _, _, t in decode} == {32, 64}
    # a request added between steps of a running batch
    late = LLM(model, block_size=4, cuda_graphs=True)
    first = late.add_request(prompts[2], params[0])
    for _ in range(6):
        late.step()
    second = late.add_request(prompts[1], params[1])
    while late.has_unfinished():
        late.step()
    expected_first = LLM(model, block_size=4).generate([prompts[2]], params[0])[0].token_ids
    assert greedy_difference(model, prompts[2], first.output_token_ids, expected_first) is None
    assert greedy_difference(model, prompts[1], second.output_token_ids, eager[1]) is None


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_cycles_on_the_static_path_equal_the_eager_drafter(k):
    # one cycle a step (verify, accept, MTP over the verified rows, chained drafts) in the static form a CUDA
    # graph captures, against the eager engine's verify and MTPDrafter: the same tokens, the same drafts taken
    model = drafting_model()
    eager = LLM(model, block_size=4, num_speculative_tokens=k)
    static = LLM(model, block_size=4, num_speculative_tokens=k, cuda_graphs=True)
    # a batch that shrinks through the buckets (4 -> 1) with contexts past index_topk 16 (the sparse branch),
    # then one short request (contexts up to 16: the dense branch)
    for lengths, max_tokens in (((5, 11, 23, 37), (40, 40, 17, 30)), ((3,), (7,))):
        prompts = _prompts(lengths)
        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
        plain = [c.token_ids for c in LLM(model, block_size=4).generate(prompts, params)]
        assert [c.token_ids for c in eager.generate(prompts, params)] == plain
        for prompt, c, want in zip(prompts, static.generate(prompts, params), plain):
            assert (differ := greedy_difference(model, prompt, c.token_ids, want)) is None, differ
    e, s = eager.stats, static.stats
    assert 0.1 < e.accepted / e.drafted < 0.95, e  # some drafts accepted, some not: every branch ran
    assert (s.verify_steps, s.drafted, s.accepted) == (e.verify_steps, e.drafted, e.accepted)
    cycles = static.graphs.cycles
    assert {T > 16 for _, T in cycles} == {False, True} and {S for S, _ in cycles} == {1, 2, 4}, cycles
    assert static.graphs.num_cycles == s.steps - 2  # every step after the two prefill steps was a cycle


def test_padding_rows_write_only_the_scratch_slot():
    model = _model(index_n_heads=16)
    llm = LLM(model, block_size=4, kv_cache_tokens=256, cuda_graphs=True)
    seqs = [llm.add_request(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            for p in _prompts((5, 11, 20))]
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in seqs):
        llm.step()  # prefill
    scratch = llm.cache.scratch_slot
    for latent in llm.cache.latent:
        latent[scratch] = 123.0  # a sentinel the padding row must overwrite
    before = [t.clone() for t in llm.cache.latent]
    fed = [len(s.token_ids) - 1 for s in seqs]  # the position each decode feeds
    llm.step()  # a decode step of 3 sequences in the bucket of 4
    written = {s.block_table[p // 4] * 4 + p % 4 for s, p in zip(seqs, fed)}
    assert (4, 1, 32) in llm.graphs.entries
    for old, new in zip(before, llm.cache.latent):
        changed = set((old != new).any(dim=-1).nonzero().flatten().tolist())
        assert changed == written | {scratch}
    assert scratch >= llm.block_manager.num_blocks * 4  # outside every block


def test_which_steps_take_the_graph_path():
    model = _model(index_n_heads=16, num_nextn_predict_layers=1)
    assert LLM(model).graphs is None  # off on a CPU by default
    assert LLM(model, num_speculative_tokens=2).graphs is None
    spec = LLM(model, num_speculative_tokens=2, cuda_graphs=True, max_num_seqs=4)
    spec.add_request(_prompts((10,))[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    batch = spec.scheduler.schedule()
    batch.is_prefill, batch.num_new_tokens, batch.num_draft_tokens = False, [3], [2]
    assert spec.graphs.handles_speculative(batch)
    batch.num_draft_tokens = [1]
    assert not spec.graphs.handles_speculative(batch)  # fewer drafts than k: eager
    batch.num_draft_tokens = [2]
    batch.seqs[0].params.logits_processors = [lambda ids, logits: logits]
    assert not spec.graphs.handles_speculative(batch)  # a logits processor: eager
    llm = LLM(model, cuda_graphs=True, max_num_seqs=4, cuda_graph_max_tokens=64)
    llm.add_request(_prompts((10,))[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    batch = llm.scheduler.schedule()
    assert batch.is_prefill and llm.graphs.handles(batch)  # 10 tokens -> a shape of 1 x 16
    batch.num_draft_tokens = [1]
    assert not llm.graphs.handles(batch)  # drafts: a speculative cycle (with num_speculative_tokens), not a step
    assert not llm.graphs.handles_speculative(batch)  # this engine does not speculate
    batch.num_draft_tokens, batch.num_new_tokens = [0], [65]
    assert not llm.graphs.handles(batch)  # 128 padded tokens > cuda_graph_max_tokens
    llm.graphs.max_prefill_graphs = 0
    batch.num_new_tokens = [10]
    assert not llm.graphs.handles(batch)  # no room for another prefill graph
    batch.num_new_tokens, batch.is_prefill = [1], False
    assert llm.graphs.handles(batch)  # decode shapes always get one


def test_seeded_sampling_on_the_static_path_repeats():
    model = _model(index_n_heads=16)
    llm = LLM(model, cuda_graphs=True)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=7, ignore_eos=True)
    a = llm.generate([[1, 2, 3]], params)[0].token_ids
    b = llm.generate([[1, 2, 3]], params)[0].token_ids
    assert a == b and len(a) == 12


def test_a_failed_capture_warns_and_decodes_eagerly(monkeypatch):
    # a fast path must not take the engine down: capture is forced on (on a CPU) and made to fail
    model = _model(index_n_heads=16)
    prompts = _prompts((4, 19))
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [c.token_ids for c in LLM(model).generate(prompts, greedy)]
    llm = LLM(model, cuda_graphs=True)
    llm.graphs.capture_enabled = True

    def fail(entry):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(llm.graphs, "_capture", fail)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        got = [c.token_ids for c in llm.generate(prompts, greedy)]
    assert got == expected and llm.graphs.failed and not llm.graphs.entries


def test_shapes_made_ahead_are_the_ones_steps_use():
    model = _model(index_n_heads=16)
    llm = LLM(model, cuda_graphs=True, max_num_seqs=8)
    assert llm.graphs.capture(3, 40, 40)  # 3 prompts of <= 40 tokens: bucket (4, 64, 64)
    made = llm.graphs.capture_decode(64, [3])  # decode of 3 sequences, contexts 16 .. 64
    assert set(llm.graphs.entries) == {(4, 64, 64), (4, 1, 16), (4, 1, 32), (4, 1, 64)} and made == 4
    prompts = _prompts((5, 12, 33))
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert len(llm.graphs.entries) == 4  # nothing new was needed
    assert not llm.graphs.capture(9, 1, 64)  # more sequences than max_num_seqs: no step would use it
    assert not llm.graphs.capture(8, 256, 256)  # 2048 padded tokens > cuda_graph_max_tokens
    assert len(llm.graphs.entries) == 4


def test_zero_bias_linears_give_the_same_tokens(monkeypatch):
    # the cuBLASLt detour for fp32 on CUDA (runner.linear), exercised on the CPU (against F.linear, without
    # the CPU's few-row kernel)
    from glm5.engine import runner

    monkeypatch.setattr(runner.linear_kernel, "linear_rows", lambda x, w: None)
    model = _model(index_n_heads=16)
    prompts = _prompts((4, 19, 33))
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [c.token_ids for c in LLM(model).generate(prompts, greedy)]
    x, w = torch.randn(8, 64), torch.randn(96, 64)
    monkeypatch.setattr(runner, "ZERO_BIAS_DEVICES", ("cpu",))
    assert torch.equal(runner.linear(x, w), torch.nn.functional.linear(x, w))
    assert (96, torch.device("cpu")) in runner._zero_biases
    for graphs in (None, True):
        assert [c.token_ids for c in LLM(model, cuda_graphs=graphs).generate(prompts, greedy)] == expected


def test_refreshed_weights_drop_the_graphs_and_the_prefix_cache():
    model = _model(index_n_heads=16)
    prompts = _prompts((6, 21))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model, cuda_graphs=True)
    llm.generate(prompts, greedy)
    assert llm.graphs.entries
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # new weights: the fused copies and every graph reading them are stale
    llm.refresh_weights()
    assert not llm.graphs.entries and not llm.runner.fused and not llm.block_manager.hash_to_block
    expected = [c.token_ids for c in LLM(model).generate(prompts, greedy)]
    assert [c.token_ids for c in llm.generate(prompts, greedy)] == expected


@pytest.mark.parametrize("cuda_graphs", [None, True], ids=["eager", "static"])
def test_refresh_while_running_registers_no_cut_chain(cuda_graphs):
    # after reset_prefix_cache a running sequence's hash chain restarted at None, so its block 2 was
    # found as the first block of an unrelated prompt (latents of other positions and context)
    model = _model(index_n_heads=16)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model, block_size=4, cuda_graphs=cuda_graphs)
    running = llm.add_request(list(range(10, 19)), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    llm.step()  # prefill: blocks 0 and 1 registered
    llm.refresh_weights()
    for _ in range(4):
        llm.step()  # block 2 completes
    prompt = running.token_ids[8:12] + [7]  # its first block holds the running sequence's block-2 tokens
    got = llm.generate([prompt], greedy)[0]
    assert got.num_cached_tokens == 0
    # a block served from another prompt's cache would change the tokens far beyond a near tie
    want = LLM(model, block_size=4).generate([prompt], greedy)[0].token_ids
    assert (differ := greedy_difference(model, prompt, got.token_ids, want)) is None, differ
