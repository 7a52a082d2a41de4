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


def test_kept_kv_cache_continues_a_partial_without_prefilling_it_again(model, tok):
    """keep_partial_kv: the aborted episodes' requests are suspended with their KV cache and resumed on the next
    call: the same tokens as an uninterrupted rollout, and nothing they had is prefilled again."""
    torch.set_num_threads(1)
    whole = {e.uid: e for e in _worker(model, tok).generate(new_episodes([0, 1], 2, seed=5))[0]}
    worker = _worker(model, tok, keep_partial_kv=True)
    _, partial = worker.generate(new_episodes([0, 1], 2, seed=5), max_engine_steps=10)
    assert len(partial) == 4 and len(worker.engine.suspended) == 4
    stats = worker.engine.stats
    prefilled = stats.prefill_tokens
    rest, still = worker.generate(partial)
    assert not still and all(e.resumed == 1 for e in rest)
    # each resumed request feeds only its last sampled token, in a decode step (a recompute prefills the prompt
    # and the 10 sampled tokens of each of the 4 again)
    assert stats.prefill_tokens == prefilled, f"{stats.prefill_tokens - prefilled} tokens prefilled again"
    for ep in rest:
        ref = whole[ep.uid]
        assert ep.tokens == ref.tokens and ep.loss_mask == ref.loss_mask and ep.versions == ref.versions
        torch.testing.assert_close(torch.tensor(ep.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)
    assert not worker.engine.suspended and worker.engine.block_manager.num_free_blocks == \
        worker.engine.block_manager.num_blocks, "blocks held after every episode finished"


def test_kept_kv_cache_survives_a_weight_update_and_stale_entries_are_released(model, tok):
    """After set_weights a resumed episode samples with the new weights on the latents the old ones cached:
    its next token's log-prob is neither the old weights' nor that of a recompute under the new ones. An
    episode that comes back restarted, or not at all (dealt to another worker), has its request released."""
    torch.set_num_threads(1)
    whole = {e.uid: e for e in _worker(model, tok).generate(new_episodes([0, 1], 2, seed=5))[0]}
    worker = _worker(model, tok, keep_partial_kv=True)
    _, partial = worker.generate(new_episodes([0, 1], 2, seed=5), max_engine_steps=6)
    snap = copy.deepcopy(partial)
    n = len(partial[0].tokens)
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in worker.engine.model.state_dict().items()}
    worker.set_weights(state, version=1)
    fresh = _worker(model, tok)
    fresh.set_weights(state, version=1)
    fresh.generate([snap[0]], max_engine_steps=2)  # the same partial, prefilled again under the new weights
    dropped = worker._suspended[partial[2].uid][0]
    partial[1].restart()
    worker.generate([partial[0], partial[1], partial[3]], max_engine_steps=2)  # partial[2]: another worker's now
    assert partial[0].resumed == 1 and partial[1].resumed == 0 and partial[0].versions[n] == 1
    assert partial[0].tokens[:n] == snap[0].tokens[:n]
    keep, recompute, old = partial[0], snap[0], whole[partial[0].uid]
    assert keep.tokens[n] != recompute.tokens[n] or abs(keep.logprobs[n] - recompute.logprobs[n]) > 1e-4, \
        "the resumed episode's token matches a recompute under the new weights: its KV cache was not kept"
    assert keep.tokens[n] != old.tokens[n] or abs(keep.logprobs[n] - old.logprobs[n]) > 1e-4, \
        "the resumed episode sampled with the old weights"
    assert dropped not in worker.engine.suspended and partial[2].uid not in worker.envs
    assert set(worker._suspended) == {partial[0].uid, partial[1].uid, partial[3].uid}  # cut again after 2 steps
    held = sum(len(seq.block_table) for seq in worker.engine.suspended.values())
    bm = worker.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks - held, "a released request's blocks were not freed"


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



class _Budgets:
    """One answer budget per prompt: group 0 short (3 tokens), the others 20 (a random policy runs to its
    budget), so that APRIL's stop after one group has something to abort."""

    max_turns = 1

    def reset(self, seed):
        self.max_new_tokens = 3 if seed % 1_000_003 == 0 else 20
        return [{"role": "user", "content": "Say something."}], None

    def step(self, turn):
        return [], 0.0, True


def _budget_worker(model, tok):
    worker = _worker(model, tok, env="countdown")
    worker.make_env = _Budgets
    return worker


def test_keep_going_holds_aprils_stop_off(model, tok):
    """generate(stop_after_groups=1, keep_going=...): past the stop, the round runs on while keep_going() says
    so (an overlapped round while the trainer trains), then aborts the rest as before."""
    torch.set_num_threads(1)
    whole = _budget_worker(model, tok).generate(new_episodes([0, 1, 2], 2, seed=0))[0]
    stopped, partial = _budget_worker(model, tok).generate(new_episodes([0, 1, 2], 2, seed=0), stop_after_groups=1)
    assert len(stopped) == 2 and len(partial) == 4, (len(stopped), len(partial))
    asked = []
    done, none_left = _budget_worker(model, tok).generate(new_episodes([0, 1, 2], 2, seed=0), stop_after_groups=1,
                                                          keep_going=lambda: asked.append(1) or True)
    assert not none_left and asked, "keep_going() answering True must let every episode finish"
    key = lambda e: (e.group, e.index)  # noqa: E731
    assert [e.tokens for e in sorted(done, key=key)] == [e.tokens for e in sorted(whole, key=key)]
    calls = []
    again, cut = _budget_worker(model, tok).generate(new_episodes([0, 1, 2], 2, seed=0), stop_after_groups=1,
                                                     keep_going=lambda: calls.append(1) or len(calls) < 4)
    assert len(calls) == 4 and len(cut) == 4, "the round stops at the first False once enough groups are done"
    assert sum(e.num_sampled for e in again + cut) > sum(e.num_sampled for e in stopped + partial)
