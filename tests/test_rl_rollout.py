"""Rollout on the engine: token in / token out over turns, partial rollouts continued exactly (glm5/rl/rollout.py)."""

import copy
import json

import pytest
import torch

from glm5.config import GLM5Config
from glm5.model.transformer import GLM5ForCausalLM
from glm5.rl.rollout import RolloutWorker, new_episodes, observation_ids
from glm5.tokenizer import default_tokenizer


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = GLM5Config.from_preset("nano", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_ids)
    return GLM5ForCausalLM(cfg)


def _worker(model, tok, env="tool-call", max_new_tokens=24, **kw):
    return RolloutWorker(copy.deepcopy(model), tok, env, max_new_tokens=max_new_tokens, **kw)


def test_partial_rollout_continued_gives_the_uninterrupted_tokens(model, tok):
    torch.set_num_threads(1)
    whole = _worker(model, tok).generate(new_episodes([0, 1], 2, seed=5))[0]
    worker2 = _worker(model, tok)
    # cut off after a prefill and 9 decode steps; continued from the partial tokens and generator states
    first_done, partial = worker2.generate(new_episodes([0, 1], 2, seed=5), max_engine_steps=10)
    assert not first_done and len(partial) == 4
    assert all(e.num_sampled == 10 for e in partial), [e.num_sampled for e in partial]
    rest, still = worker2.generate(partial)
    assert not still and all(e.resumed == 1 for e in rest)
    got = {e.uid: e for e in rest}
    for ref in whole:
        ep = got[ref.uid]
        assert ep.tokens == ref.tokens, f"episode {ref.uid}: continued tokens differ from the uninterrupted ones"
        assert ep.loss_mask == ref.loss_mask and ep.versions == ref.versions
        torch.testing.assert_close(torch.tensor(ep.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)


def test_multi_turn_appends_tool_results_as_tokens_never_retokenizing(tok):
    # a scripted policy through the real worker: the engine is bypassed by feeding known turns
    torch.manual_seed(0)
    cfg = GLM5Config.from_preset("nano", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_ids)
    worker = RolloutWorker(GLM5ForCausalLM(cfg), tok, "tool-call", max_new_tokens=8)
    [ep] = new_episodes([3], 1, seed=0)
    worker._start(ep)
    env = worker.envs[ep.uid]
    expected = env.task["expected"]
    # odd spacing that a re-render would normalise: the episode must keep these exact ids
    call = (f"hmm </think> <tool_call>{expected['name']}"
            + "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in expected["arguments"].items())
            + "</tool_call>")
    sampled = tok.encode(call, allow_special=True) + [tok.special_token_id("<|observation|>")]
    ep.tokens, ep.loss_mask = list(sampled), [1] * len(sampled)
    ep.logprobs, ep.versions = [-1.0] * len(sampled), [0] * len(sampled)
    assert worker._end_turn(ep) is False
    assert ep.rewards == [1.0]
    assert ep.tokens[: len(sampled)] == sampled, "the sampled ids were changed"
    obs = ep.tokens[len(sampled):]
    text = tok.decode(obs)
    assert text.startswith("<tool_response>") and text.endswith("<|assistant|><think>"), text
    assert json.loads(text[len("<tool_response>"): text.index("</tool_response>")]) == env.result
    assert ep.loss_mask[len(sampled):] == [0] * len(obs) and set(ep.versions[len(sampled):]) == {-1}
    # the answer turn: its reward comes from the tool's result
    value = str(next(iter(env.result.values())))
    answer = tok.encode(f"</think>It is {value}.", allow_special=True) + [tok.special_token_id("<|endoftext|>")]
    ep.turn_start = len(ep.tokens)
    ep.tokens += answer
    ep.loss_mask += [1] * len(answer)
    assert worker._end_turn(ep) is True
    assert ep.reward == pytest.approx(1.5)


def test_observation_ids_skip_the_token_the_model_already_sampled(tok):
    obs = [{"role": "tool", "content": '{"a": 1}'}]
    ids = observation_ids(tok, obs, None)
    assert tok.decode(ids) == '<|observation|><tool_response>{"a": 1}</tool_response><|assistant|><think>'
    assert observation_ids(tok, obs, tok.special_token_id("<|observation|>")) == ids[1:]


def test_a_failing_env_marks_the_episode_failed_and_the_rest_go_on(model, tok, monkeypatch):
    torch.set_num_threads(1)
    worker = _worker(model, tok, max_new_tokens=4)
    original = type(worker.make_env())

    class Broken(original):
        def step(self, turn):
            if self.task["messages"][0]["content"] and getattr(self, "_broken", False):
                raise RuntimeError("env exploded")
            return super().step(turn)

    def factory():
        env = Broken()
        env._broken = len(worker.envs) == 0  # the first episode's env only
        return env

    worker.make_env = factory
    done, partial = worker.generate(new_episodes([0], 3, seed=1))
    statuses = sorted(e.status for e in done)
    assert statuses == ["done", "done", "failed"]
    failed = next(e for e in done if e.status == "failed")
    assert "env exploded" in failed.error and failed.reward == 0.0 and sum(failed.loss_mask) == 0

