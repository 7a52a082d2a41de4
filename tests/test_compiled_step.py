"""Compiled CPU decode steps (glm5/engine/compiled.py): the same greedy tokens as the eager engine, across
the dense and sparse branches and several context buckets with one graph each; weights refreshed; a failing
compile falls back to eager steps; the switch is validated."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import drafting_model, greedy_difference, randomize_, tiny_config

from glm5 import GLM5ForCausalLM
from glm5.engine import LLM, EngineConfig, SamplingParams
from glm5.engine import compiled as compiled_module


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return randomize_(GLM5ForCausalLM(tiny_config()), std=0.05, seed=seed).eval()


def _prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


def _check_same(model, prompts, got, want):
    for prompt, a, b in zip(prompts, got, want):
        problem = greedy_difference(model, prompt, a.token_ids, b.token_ids)
        assert problem is None, problem


def test_compiled_decode_equals_eager_and_refreshes():
    model = _model()
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = _prompts([10, 7, 13])  # 3 sequences: the bucket of 4; contexts 8 .. 53: buckets 16, 32, 64
    eager = LLM(model)
    compiled = LLM(model, compile=True, compile_mode="default")
    want = eager.generate(prompts, params)
    got = compiled.generate(prompts, params)
    _check_same(model, prompts, got, want)
    steps = compiled.compiled
    assert steps.failed is None, steps.failed
    # every decode step ran compiled (the first token of each sequence comes from the eager prefill)
    assert steps.num_runs == 39
    # one function per (bucket, branch); the context buckets 32 and 64 share the sparse one (T is dynamic)
    assert set(steps.functions) == {(4, False, 0, 1), (4, True, 0, 1)}
    assert {shape[-1] for shape in steps.ready} == {16, 32, 64}
    # new weights: the frozen steps are dropped and compiled again, and follow the new weights
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    eager.refresh_weights()
    compiled.refresh_weights()
    assert not steps.functions and not steps.ready
    prompts, params = _prompts([5], seed=3), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    _check_same(model, prompts, compiled.generate(prompts, params), eager.generate(prompts, params))
    assert set(steps.functions) == {(1, False, 0, 1)}  # contexts up to 13: the dense branch only


def test_a_failing_compile_falls_back_to_eager_steps(monkeypatch):
    model = _model(1)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler here")

        return call

    monkeypatch.setattr(compiled_module.torch, "compile", broken)
    llm = LLM(model, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = llm.generate(_prompts([9]), params)
    assert any("compiling the decode step failed" in str(w.message) for w in caught)
    assert llm.compiled.failed and "no C++ compiler" in llm.compiled.failed
    want = LLM(model).generate(_prompts([9]), params)
    assert got[0].token_ids == want[0].token_ids  # the eager engine ran every step


def test_compile_switch_is_validated():
    model = _model()
    with pytest.raises(ValueError, match="compile_mode"):
        EngineConfig(compile=True, compile_mode="fastest")
    with pytest.raises(ValueError, match="compile="):
        EngineConfig(compile="yes")
    with pytest.raises(ValueError, match="choose one"):
        LLM(model, compile=True, cuda_graphs=True)
    assert LLM(model).compiled is None  # off by default


def test_compile_flags_reach_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    EngineConfig.add_arguments(parser)
    config = EngineConfig.from_args(parser.parse_args(["--compile", "--compile-mode", "default"]))
    assert config.compile and config.compile_mode == "default"
    assert not EngineConfig.from_args(parser.parse_args([])).compile


@pytest.mark.slow
def test_max_autotune_step_equals_eager():
    """The benchmark's mode (inductor's C++ GEMM templates on frozen weights), one sequence."""
    model = _model(2)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = _prompts([20], seed=2)  # contexts 21 .. 30: the sparse branch
    compiled = LLM(model, compile=True)
    got = compiled.generate(prompts, params)
    _check_same(model, prompts, got, LLM(model).generate(prompts, params))
    assert compiled.compiled.failed is None and compiled.compiled.num_runs == 9


def test_compiled_speculative_cycle_equals_the_eager_drafter():
    """A whole MTP cycle (verify, accept, draft) as one compiled call: the tokens of plain greedy decoding and
    the drafts the eager drafter makes."""
    model = drafting_model()
    prompts = _prompts([37])  # contexts 38 .. 70: the sparse branch (index_topk 16), buckets 64 and 128
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    eager = LLM(model, num_speculative_tokens=2)
    want = eager.generate(prompts, params)
    compiled = LLM(model, num_speculative_tokens=2, compile=True, compile_mode="default")
    got = compiled.generate(prompts, params)
    _check_same(model, prompts, got, LLM(model).generate(prompts, params))
    _check_same(model, prompts, got, want)
    steps, e, c = compiled.compiled, eager.stats, compiled.stats
    assert steps.failed is None, steps.failed
    assert set(steps.functions) == {(1, True, 2, 1)} and {shape[-1] for shape in steps.ready} == {64, 128}
    assert steps.num_runs == c.verify_steps == c.steps - 1  # every step after the prefill: one compiled cycle
    assert 0 < e.accepted < e.drafted, e
    assert (c.verify_steps, c.drafted, c.accepted) == (e.verify_steps, e.drafted, e.accepted)


def test_warm_up_compiles_both_branches_of_each_bucket(monkeypatch):
    llm = LLM(_model(), compile=True, max_num_seqs=8)
    calls = []
    monkeypatch.setattr(llm.compiled, "_call", lambda key, ids, positions, slots, ctx: calls.append((*key, ctx.shape[1])))
    llm.compiled.warm_up([1, 3])
    # index_topk 16: contexts up to 16 (dense) and 32 (sparse); 3 sequences run in the bucket of 4
    assert calls == [(1, False, 0, 1, 16), (1, True, 0, 1, 32), (4, False, 0, 1, 16), (4, True, 0, 1, 32)]
    with pytest.raises(ValueError, match="more than the engine's 8 sequences"):
        llm.compiled.warm_up([9])
    # with MTP speculation, each bucket's speculative cycle too
    llm = LLM(_model(), compile=True, num_speculative_tokens=3)
    calls = []
    monkeypatch.setattr(llm.compiled, "_call", lambda key, ids, positions, slots, ctx: calls.append((*key, ids.shape[0])))
    llm.compiled.warm_up([1])
    assert calls == [(1, False, 0, 1, 1), (1, False, 3, 1, 4), (1, True, 0, 1, 1), (1, True, 3, 1, 4)]
    # with decode_steps N, each bucket's N-step call too (its slots [S, N])
    llm = LLM(_model(), compile=True, decode_steps=3)
    calls = []
    monkeypatch.setattr(llm.compiled, "_call",
                        lambda key, ids, positions, slots, ctx: calls.append((*key, tuple(slots.shape))))
    llm.compiled.warm_up([2])
    assert calls == [(2, False, 0, 1, (2,)), (2, False, 0, 3, (2, 3)), (2, True, 0, 1, (2,)), (2, True, 0, 3, (2, 3))]


def test_decode_steps_give_the_eager_tokens_and_stop_inside_a_group():
    """decode_steps=3: three greedy steps per compiled call, each fed the token before it inside the compiled code;
    the tokens are the eager engine's, max_tokens and a stop token that fall inside a group of three cut it there
    (the steps computed after them are dropped), and the cache stays right for the next request's prefix."""
    model = _model(4)
    prompts = _prompts([20], seed=4)  # contexts 21 .. 40: the sparse branch, one bucket
    eager, compiled = LLM(model), LLM(model, compile=True, compile_mode="default", decode_steps=3)
    long = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True)  # 16 decode steps: 5 groups and a cut
    want = eager.generate(prompts, long)
    got = compiled.generate(prompts, long)
    _check_same(model, prompts, got, want)
    steps = compiled.compiled
    assert steps.failed is None, steps.failed
    assert set(steps.functions) == {(1, True, 0, 3)} and steps.num_runs == 6  # ceil(16 / 3) calls
    assert compiled.stats.steps == 7 and compiled.stats.decode_tokens == 16
    # a stop token whose first occurrence is inside a group: the output ends there, as the eager engine's does
    out = want[0].token_ids
    stop = next(t for i, t in enumerate(out) if i % 3 != 0 and i > 2 and t not in out[:i])
    stopping = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, stop_token_ids=[stop])
    got, want = compiled.generate(prompts, stopping), eager.generate(prompts, stopping)
    assert got[0].token_ids == want[0].token_ids and got[0].token_ids[-1] == stop
    assert got[0].finish_reason == want[0].finish_reason == "stop"
    # sampled or penalized sequences decode one step at a time, compiled as before
    sampled = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3)
    runs = steps.num_runs
    _check_same(model, prompts, compiled.generate(prompts, sampled), eager.generate(prompts, sampled))
    assert steps.num_runs == runs + 5 and (1, True, 0, 1) in steps.functions
