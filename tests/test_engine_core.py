"""Engine behaviour: latent cache layout, prefix reuse, continuous batching, preemption, sampling, speculation."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_config

from glm5 import GLM5Config, GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams
from glm5.engine.block_manager import BlockManager
from glm5.engine.kv_cache import bytes_per_token
from glm5.engine.sampler import Sampler, processed_probs
from glm5.engine.sequence import Sequence
from glm5.engine.speculative import verify_greedy


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(GLM5ForCausalLM(tiny_config(index_n_heads=16))).eval()


def _prompts(lengths=(5, 11, 23, 37), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


def greedy(n=12, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


# ---------------------------------------------------------------------------------------- cache layout
def test_latent_cache_stores_576_plus_128_values_per_token_per_layer_for_glm5():
    cfg = GLM5Config.from_preset("glm5-744b")
    # 78 layers x (512 latent + 64 rope + 128 indexer key) x 2 bytes = 109,824 bytes per token in BF16
    assert bytes_per_token(cfg, torch.bfloat16) == 109_824


def test_cache_tensors_are_latent_wide_not_per_head(model):
    cfg = model.config
    llm = LLM(model, kv_cache_tokens=64, block_size=8)
    assert len(llm.cache.latent) == cfg.num_hidden_layers
    for latent, keys in zip(llm.cache.latent, llm.cache.index_keys):
        assert latent.shape == (64 + 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # + the scratch slot
        assert keys.shape == (64 + 1, cfg.index_head_dim)


# ---------------------------------------------------------------------------------------- blocks
def test_block_manager_shares_full_prefix_blocks_and_recycles_freed_ones():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Sequence(list(range(10)), greedy())
    bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.commit(a)
    b = Sequence(list(range(8)) + [99, 98, 97], greedy())
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert bm.ref_count[a.block_table[0]] == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    c = Sequence(list(range(12)), greedy())
    assert bm.match_prefix(c) == 8, "freed blocks keep their contents until reused"


@pytest.mark.parametrize("cuda_graphs", [None, True], ids=["eager", "static"])
def test_prefix_reuse_skips_cached_tokens_and_keeps_output(model, cuda_graphs):
    shared = _prompts((40,), seed=5)[0]
    prompts = [shared + [1, 2, 3], shared + [7, 8]]
    fresh = [LLM(model, block_size=8).generate([p], greedy())[0].token_ids for p in prompts]
    llm = LLM(model, block_size=8, cuda_graphs=cuda_graphs)
    first = llm.generate([prompts[0]], greedy())[0]
    second = llm.generate([prompts[1]], greedy())[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 40
    assert [first.token_ids, second.token_ids] == fresh


# ---------------------------------------------------------------------------------------- batching
def test_requests_join_and_leave_the_running_batch(model):
    prompts = _prompts()
    alone = [LLM(model).generate([p], greedy(6 + 3 * i))[0].token_ids for i, p in enumerate(prompts)]
    llm = LLM(model, max_num_seqs=2, max_num_batched_tokens=16)
    seqs = [llm.add_request(prompts[0], greedy(6)), llm.add_request(prompts[1], greedy(9))]
    for _ in range(3):
        llm.step()
    seqs += [llm.add_request(prompts[2], greedy(12)), llm.add_request(prompts[3], greedy(15))]
    sizes = []
    while llm.has_unfinished():
        llm.step()
        sizes.append(llm.num_running)
    assert max(sizes) <= 2
    assert [s.output_token_ids for s in seqs] == alone


def test_a_full_cache_preempts_instead_of_failing(model):
    prompts = _prompts((20, 21, 22, 23), seed=2)
    expected = [c.token_ids for c in LLM(model).generate(prompts, greedy(30))]
    llm = LLM(model, block_size=4, kv_cache_tokens=112)  # room for ~2 of the 4 sequences at full length
    got = [c.token_ids for c in llm.generate(prompts, greedy(30))]
    assert llm.stats.preemptions > 0
    assert got == expected


def test_prompt_longer_than_the_context_is_rejected(model):
    llm = LLM(model, max_model_len=32)
    with pytest.raises(ValueError, match="context"):
        llm.add_request(list(range(40)), greedy())
    with pytest.raises(ValueError, match="empty"):
        llm.add_request([], greedy())
    with pytest.raises(ValueError, match="token ids"):
        llm.add_request([1, 999], greedy())


def test_abort_frees_the_blocks(model):
    llm = LLM(model, block_size=4, kv_cache_tokens=64)
    seq = llm.add_request(_prompts((30,))[0], greedy(20))
    llm.step()
    assert llm.block_manager.num_free_blocks < 16
    assert llm.abort(seq.request_id)
    assert llm.block_manager.num_free_blocks == 16 and not llm.has_unfinished()


def _drain(llm, max_steps=500):
    for _ in range(max_steps):
        if not llm.has_unfinished():
            return
        llm.step()
    raise AssertionError(f"still unfinished after {max_steps} steps (no blocks for the waiting request?)")


def test_a_suspended_request_resumes_on_its_kept_cache_or_is_recomputed_once_its_blocks_are_needed(model):
    """suspend / resume (RL's partial rollouts): out of the batch with its KV blocks kept, back where it stopped
    (nothing prefilled again); when another request needs the blocks, the suspended one gives them back and is
    recomputed on resume. The same tokens either way."""
    prompts = _prompts((20, 21, 115), seed=3)
    expected = [c.token_ids for c in LLM(model).generate(prompts[:2], greedy(24))]
    llm = LLM(model, block_size=4, kv_cache_tokens=160)
    a, b = (llm.add_request(p, greedy(24)) for p in prompts[:2])
    for _ in range(6):
        llm.step()
    held = len(a.block_table)
    assert llm.suspend(a.request_id) is a and held > 0
    _drain(llm)  # b alone; a waits with its blocks
    assert b.output_token_ids == expected[1] and len(a.block_table) == held and len(a.output_token_ids) < 24
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks - held
    prefilled = llm.stats.prefill_tokens
    llm.resume(a.request_id)
    _drain(llm)
    assert a.output_token_ids == expected[0]
    assert llm.stats.prefill_tokens == prefilled, "the resumed request was prefilled again"

    a = llm.add_request(prompts[0], greedy(24))
    for _ in range(6):
        llm.step()
    llm.suspend(a.request_id)
    c = llm.add_request(prompts[2], greedy(30))  # 145 of 160 slots: only if a gives its blocks back
    _drain(llm)
    assert len(c.output_token_ids) == 30 and not a.block_table, "the suspended request kept blocks another needed"
    prefilled = llm.stats.prefill_tokens
    llm.resume(a.request_id)
    _drain(llm)
    assert a.output_token_ids == expected[0]
    assert llm.stats.prefill_tokens > prefilled, "a request without blocks resumed without being recomputed"
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert not llm.release(a.request_id) and llm.suspend("no such request") is None
    d = llm.add_request(prompts[1], greedy(24))
    llm.step()
    llm.suspend(d.request_id)
    assert llm.abort(d.request_id) and not d.block_table and not llm.suspended  # abort takes suspended ones too
    with pytest.raises(ValueError, match="not suspended"):
        llm.resume(a.request_id)


# ---------------------------------------------------------------------------------------- sampling
def test_same_seed_same_tokens_in_any_batch(model):
    prompt = _prompts((9,))[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = LLM(model).generate([prompt], params)[0].token_ids
    batched = LLM(model).generate(_prompts() + [prompt], [greedy()] * 4 + [params])[-1].token_ids
    other = LLM(model).generate([prompt], SamplingParams(temperature=1.0, max_tokens=16, seed=99, ignore_eos=True))
    assert alone == batched
    assert other[0].token_ids != alone


def test_top_k_one_is_greedy_and_stop_tokens_and_max_tokens_end_generation(model):
    prompt = _prompts((7,))[0]
    g = LLM(model).generate([prompt], greedy(10))[0]
    k1 = LLM(model).generate([prompt], SamplingParams(temperature=0.8, top_k=1, max_tokens=10, ignore_eos=True))[0]
    assert k1.token_ids == g.token_ids and g.finish_reason == "length"
    stop = g.token_ids[4]
    s = LLM(model).generate([prompt], greedy(10, stop_token_ids=[stop]))[0]
    assert s.token_ids == g.token_ids[: g.token_ids.index(stop) + 1] and s.finish_reason == "stop"


def test_logprobs_are_the_models_log_softmax(model):
    prompt = _prompts((6,))[0]
    out = LLM(model).generate([prompt], greedy(3, logprobs=3))[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1)
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert abs(lp.logprob - float(expected[i, lp.token_id])) < 1e-4
        assert [t for t, _ in lp.top] == expected[i].topk(3).indices.tolist()


def test_top_p_min_p_and_penalties_reshape_the_distribution():
    seq = Sequence([1, 2, 3], SamplingParams(temperature=1.0, top_p=0.5))
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert processed_probs(logits, seq).nonzero().flatten().tolist() == [0, 1]
    seq.params = SamplingParams(temperature=1.0, min_p=0.6)
    assert processed_probs(logits, seq).nonzero().flatten().tolist() == [0, 1]
    seq = Sequence([0], SamplingParams(temperature=0, repetition_penalty=100.0))
    tokens, _ = Sampler()(torch.tensor([[5.0, 4.0, 0.0]]), [seq])
    assert tokens == [1], "the repeated token 0 is penalized below token 1"
    seq = Sequence([2], SamplingParams(temperature=0, frequency_penalty=2.0))
    seq.token_ids += [0, 0]
    tokens, _ = Sampler()(torch.tensor([[5.0, 4.0, 0.0]]), [seq])
    assert tokens == [1], "token 0 generated twice loses 4.0"


# ---------------------------------------------------------------------------------------- speculation
def test_verify_accepts_the_matching_prefix_and_adds_the_models_token():
    logits = torch.eye(5)[[1, 2, 4, 0]]  # greedy choices 1, 2, 4, 0
    assert verify_greedy(logits, [1, 2, 3]) == (2, [1, 2, 4])
    assert verify_greedy(logits, [1, 2, 4]) == (3, [1, 2, 4, 0])
    assert verify_greedy(logits, [3, 2, 4]) == (0, [1])


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_speculation_keeps_greedy_output_identical(model, k):
    prompts = _prompts()
    plain = [c.token_ids for c in LLM(model, block_size=4).generate(prompts, greedy(16))]
    llm = LLM(model, block_size=4, num_speculative_tokens=k)
    spec = llm.generate(prompts, greedy(16))
    assert [c.token_ids for c in spec] == plain
    assert llm.stats.verify_steps > 0 and llm.stats.drafted == k * llm.stats.verify_steps
    # every token after a sequence's first comes from a verifying step: the step's own token + its accepted
    # drafts, so the accept length is exactly those tokens over those steps (not merely somewhere in [1, k+1])
    after_first = sum(len(c.token_ids) - 1 for c in spec)
    assert llm.stats.verify_steps + llm.stats.accepted == after_first, llm.stats
    assert llm.stats.mean_accept_length == pytest.approx(after_first / llm.stats.verify_steps, rel=1e-12)


def test_mtp_drafts_get_accepted_when_the_mtp_layer_predicts_well():
    # A model that always predicts token 42: every layer's output projection is zero, so the hidden state is
    # the (constant, positive) embedding; the MTP layer passes its embedding input through eh_proj.
    model = GLM5ForCausalLM(tiny_config(index_n_heads=16)).eval()
    hidden = model.config.hidden_size
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight[42] = 1.0
        model.mtp[0].eh_proj.weight[:, :hidden] = torch.eye(hidden)
    llm = LLM(model, num_speculative_tokens=2)
    out = llm.generate([[1, 2, 3]], greedy(13))[0]
    assert out.token_ids == [42] * 13
    assert llm.stats.mean_accept_length > 2.5, llm.stats


def test_logits_processors_constrain_the_choice(model):
    def only_even(output_ids, logits):
        masked = torch.full_like(logits, float("-inf"))
        masked[0::2] = logits[0::2]
        return masked

    out = LLM(model).generate([_prompts((5,))[0]], greedy(8, logits_processors=[only_even]))[0]
    assert all(t % 2 == 0 for t in out.token_ids), out.token_ids


class _Forced:
    """A stateless processor that writes a fixed script: the token after output o is script[len(o)]."""

    stateless = True

    def __init__(self, script):
        self.script = script

    def __call__(self, output_ids, logits):
        forced = torch.full_like(logits, float("-inf"))
        forced[self.script[min(len(output_ids), len(self.script) - 1)]] = 0.0
        return forced


def test_stateless_processors_keep_speculating_and_constrain_drafts_and_verification(model):
    script = [7, 3, 3, 200, 11, 7, 9, 9, 9, 1, 5, 250, 4]  # 1 from the prefill + 3 steps of 1 + 3 drafts
    llm = LLM(model, num_speculative_tokens=3)
    out = llm.generate([_prompts((9,))[0]], greedy(len(script), logits_processors=[_Forced(script)]))[0]
    assert out.token_ids == script
    # the drafts were constrained too, so every one was accepted: 4 tokens per verifying step
    assert llm.stats.verify_steps > 0 and llm.stats.accepted == llm.stats.drafted, llm.stats


def test_a_stateless_bias_under_speculation_gives_the_plain_greedy_tokens(model):
    from glm5.serve.json_mode import LogitBias

    prompts = _prompts()
    bias = LogitBias({5: 8.0, 17: 6.0, 100: 5.0})
    plain = [c.token_ids for c in LLM(model).generate(prompts, greedy(16, logits_processors=[bias]))]
    llm = LLM(model, num_speculative_tokens=2)
    spec = [c.token_ids for c in llm.generate(prompts, greedy(16, logits_processors=[bias]))]
    assert spec == plain and llm.stats.verify_steps > 0


def test_a_stateful_processor_turns_speculation_off_for_its_sequence(model):
    calls = []

    def stateful(output_ids, logits):
        calls.append(len(output_ids))
        return logits

    llm = LLM(model, num_speculative_tokens=2)
    llm.generate([_prompts((9,))[0]], greedy(6, logits_processors=[stateful]))
    assert llm.stats.verify_steps == 0 and calls == list(range(6))


def test_engine_mtp_layer_matches_the_models_mtp_logits(model, monkeypatch):
    """The drafter runs the MTP layer on the engine's fast paths (fused attention, norms, short MoE path);
    over a prompt its logits must be the model's own MTP logits."""
    from glm5.engine.runner import ModelRunner

    prompt = _prompts((40,))[0]
    seen = []
    original = ModelRunner.forward_mtp

    def record(self, inputs, hidden, depth=0):
        out = original(self, inputs, hidden, depth)
        seen.append((inputs.input_ids.clone(), self.logits(out)))
        return out

    monkeypatch.setattr(ModelRunner, "forward_mtp", record)
    llm = LLM(model, num_speculative_tokens=1)
    first = llm.generate([prompt], greedy(3))[0].token_ids[:1]
    ids, engine_logits = seen[0]  # the prefill's pass: the token after each prompt position
    assert ids.tolist() == prompt[1:] + first
    with torch.no_grad():
        ref = model(torch.tensor([prompt + first]), return_mtp=True).mtp_logits[0][0]  # [T - 1, V]
    assert (engine_logits[: len(prompt)] - ref[: len(prompt)]).abs().max() < 1e-4
