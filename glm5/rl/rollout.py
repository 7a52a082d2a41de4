"""Rollout on the engine: multi-turn episodes, token in / token out, with APRIL's partial rollouts.

    from glm5.rl.rollout import RolloutWorker, new_episodes
    worker = RolloutWorker(model, tokenizer, "tool-call", max_new_tokens=48, temperature=1.0)
    episodes = new_episodes(group_ids=[0, 1], group_size=4, seed=0)        # prompts come from env.reset(seed)
    done, partial = worker.generate(episodes, stop_after_groups=1)       # APRIL: stop once 1 group is done
    worker.set_weights(state_dict, version=1)                             # weight sync

Token in / token out: an episode is the prompt's ids followed by every token of the conversation after it, in
order: the ids the engine sampled (loss_mask 1, each with the engine's log-prob and the policy version that
sampled it) and the ids of each observation (tool results rendered with glm5.chat and encoded on their own,
loss_mask 0). The conversation is never re-rendered or re-tokenized from text: the ids the model produced are
the ids it is trained on. Each assistant turn's text is decoded only to be parsed for the env.

Partial rollouts (APRIL, arXiv 2509.18521): `generate(..., stop_after_groups=n)` aborts what is still running
once n groups have finished; an aborted episode keeps its tokens, log-probs, versions, and the state of its own
sampling generator. Continued later (possibly under newer weights), it prefills what it has and samples on
from the same generator state, so under the same weights it produces exactly the tokens an uninterrupted
rollout would have (tests/test_rl_rollout.py). With `keep_partial_kv` the engine suspends an aborted episode
instead (its KV cache kept) and resumes it when the episode comes back to this worker, so what it has is not
prefilled again; after a weight update its cached latents are those of the weights that sampled them (an
in-flight update, as PipelineRL's), one more difference between the engine's and the trainer's log-probs,
which `mismatch_kl` measures and TIS / IcePop correct. Anywhere else, or once the engine needed the blocks,
it is prefilled as above.

A failing env or reward (it raises) marks that episode "failed" with reward 0 and loss mask 0; the run goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from glm5.chat import parse_output, render_messages, render_parts
from glm5.engine.llm import LLMEngine
from glm5.engine.sequence import SamplingParams


@dataclass
class Episode:
    """One response of a group: a prompt and the conversation after it, as token ids."""

    group: int  # the prompt's index in the data stream (its env seed derives from it)
    index: int  # position within its group
    env_seed: int
    sample_seed: int
    prompt_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # everything after the prompt
    loss_mask: list[int] = field(default_factory=list)  # 1: sampled by the policy
    logprobs: list[float] = field(default_factory=list)  # engine log-prob per token (0 for observations)
    versions: list[int] = field(default_factory=list)  # policy version per token (-1 for observations)
    turn_start: int = 0  # where the current assistant turn's tokens begin in `tokens`
    turn_texts: list[str] = field(default_factory=list)  # finished assistant turns, as decoded (env replay)
    rewards: list[float] = field(default_factory=list)
    status: str = "new"  # new | partial | done | failed
    truncated: bool = False  # the last turn hit max_new_tokens
    generator_state: torch.Tensor | None = None  # the sampling generator between requests
    error: str | None = None
    resumed: int = 0  # times continued after an abort
    slot: int = -1  # the rollout worker that last ran it (with keep_partial_kv its KV cache waits there)

    @property
    def uid(self) -> str:
        return f"{self.group}-{self.index}"

    @property
    def reward(self) -> float:
        return float(sum(self.rewards))

    @property
    def num_sampled(self) -> int:
        return int(sum(self.loss_mask))

    def min_version(self) -> int | None:
        sampled = [v for v, m in zip(self.versions, self.loss_mask) if m]
        return min(sampled) if sampled else None

    def restart(self) -> None:
        """Drop everything generated (a partial too stale to continue): the same prompt starts over."""
        self.tokens, self.loss_mask, self.logprobs, self.versions = [], [], [], []
        self.turn_start, self.turn_texts, self.rewards = 0, [], []
        self.status, self.truncated, self.generator_state, self.error = "new", False, None, None


def new_episodes(group_ids: list[int], group_size: int, seed: int) -> list[Episode]:
    """group_size episodes per prompt index; a prompt's env seed depends only on (seed, index), and each
    episode draws its tokens from its own generator."""
    return [Episode(group=g, index=i, env_seed=seed * 1_000_003 + g, sample_seed=(seed * 1_000_003 + g) * 64 + i)
            for g in group_ids for i in range(group_size)]


def observation_ids(tokenizer, messages: list[dict], last_token: int | None, enable_thinking: bool = True) -> list[int]:
    """Ids of the messages after an assistant turn, then the next `<|assistant|><think>`; rendered with the
    chat format. The `<|observation|>` / `<|user|>` that opens them is left out when the model already
    sampled it (it ends the assistant's turn)."""
    parts = render_parts([{"role": "assistant", "content": ""}] + messages, None, enable_thinking=enable_thinking)
    # drop [gMASK]<sop> and the placeholder assistant turn
    text = "".join(t for t, _ in parts[3:])
    ids = tokenizer.encode(text, allow_special=True)
    if ids and last_token is not None and ids[0] == last_token:
        ids = ids[1:]
    return ids


class RolloutWorker:
    """An engine, an env factory and a reward: runs episodes turn by turn, batched across episodes."""

    def __init__(self, model, tokenizer, env: str, *, max_new_tokens: int = 48, temperature: float = 1.0,
                 top_p: float = 1.0, reward: str | None = None, env_kwargs: dict | None = None,
                 max_model_len: int | None = None, kv_cache_tokens: int = 32768, max_num_seqs: int = 64,
                 version: int = 0, keep_partial_kv: bool = False):
        from glm5.rl.env import load_reward, make_env

        self.tokenizer = tokenizer
        self.env_spec, self.env_kwargs = env, dict(env_kwargs or {})
        self.make_env = lambda: make_env(env, **self.env_kwargs)
        self.reward_fn = load_reward(reward)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.engine = LLMEngine(model, kv_cache_tokens=kv_cache_tokens, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=2048, max_model_len=max_model_len,
                                eos_token_ids=tokenizer.eos_token_ids)
        self.version = version
        self.envs: dict[str, object] = {}  # live env per running episode
        self.conversations: dict[str, tuple[list[dict], list | None]] = {}  # its messages so far, and tools
        self._seqs: dict = {}  # request id -> the engine's Sequence (its sampling generator)
        self.keep_partial_kv = keep_partial_kv
        self._suspended: dict[str, tuple[str, int]] = {}  # episode uid -> (its suspended request, its token count)
        self.stats = {"tokens": 0, "seconds": 0.0, "kv_resumed": 0}

    # ------------------------------------------------------------------ weights
    def set_weights(self, state_dict: dict, version: int) -> int:
        """Copy new policy weights in (same shapes), rebuild the engine's fused weights; -> the version."""
        self.engine.model.load_state_dict(state_dict)
        self.engine.refresh_weights()
        self.version = int(version)
        return self.version

    # ------------------------------------------------------------------ episodes
    def _env_for(self, ep: Episode):
        """The episode's live env; a continued episode's env is rebuilt by replaying its finished turns."""
        env = self.envs.get(ep.uid)
        if env is not None:
            return env
        env = self.make_env()
        messages, tools = env.reset(ep.env_seed)
        conversation = list(messages)
        for text in ep.turn_texts:
            turn = parse_output(text, tools)
            observation, _, _ = env.step(turn)
            conversation += [turn.to_message()] + list(observation)
        self.envs[ep.uid] = env
        self.conversations[ep.uid] = (conversation, tools)
        return env

    def _start(self, ep: Episode) -> None:
        self._env_for(ep)
        if ep.status == "new":
            messages, tools = self.conversations[ep.uid]
            ep.prompt_ids = self.tokenizer.encode(render_messages(messages, tools), allow_special=True)

    def _finish(self, ep: Episode, env, reason: str | None) -> None:
        ep.status = "done"
        if self.reward_fn is not None:
            ep.rewards = [float(self.reward_fn(list(self.conversations[ep.uid][0]), env))]
        self._forget(ep.uid)

    def _fail(self, ep: Episode, err: Exception) -> None:
        ep.status, ep.error = "failed", f"{type(err).__name__}: {err}"
        ep.rewards = [0.0]
        ep.loss_mask = [0] * len(ep.tokens)
        self._forget(ep.uid)

    def _forget(self, uid: str) -> None:
        self.envs.pop(uid, None)
        self.conversations.pop(uid, None)

    def _request(self, ep: Episode) -> str:
        """Queue the episode's next request: prompt + everything so far; sampling continues its generator."""
        # an env may give its task a shorter budget (`env.max_new_tokens` after reset)
        budget = min(self.max_new_tokens, getattr(self.envs.get(ep.uid), "max_new_tokens", None) or self.max_new_tokens)
        remaining = budget - (len(ep.tokens) - ep.turn_start)
        params = SamplingParams(max_tokens=max(1, remaining), temperature=self.temperature, top_p=self.top_p,
                                seed=ep.sample_seed, logprobs=0)
        seq = self.engine.add_request(ep.prompt_ids + ep.tokens, params, request_id=f"{ep.uid}/{len(ep.tokens)}")
        if ep.generator_state is not None:
            seq.generator.set_state(ep.generator_state)
        self._seqs[seq.request_id] = seq
        return seq.request_id

    def _end_turn(self, ep: Episode) -> bool:
        """The assistant's turn is complete: parse it, step the env, append the observation. -> done?"""
        env = self.envs[ep.uid]
        turn_ids = ep.tokens[ep.turn_start :]
        if turn_ids and turn_ids[-1] in self.engine.eos_token_ids:  # the token that ended the turn is no text
            turn_ids = turn_ids[:-1]
        text = self.tokenizer.decode(turn_ids)
        conversation, tools = self.conversations[ep.uid]
        turn = parse_output(text, tools)
        observation, reward, done = env.step(turn)
        if not isinstance(reward, (int, float)) or isinstance(reward, bool) or reward != reward:
            raise TypeError(f"the env's step returned reward {reward!r}, not a number")
        ep.turn_texts.append(text)
        ep.rewards.append(float(reward))
        conversation += [turn.to_message()] + list(observation)
        max_turns = getattr(env, "max_turns", 4)
        if done or not observation or len(ep.turn_texts) >= max_turns or ep.truncated:
            return True
        ids = observation_ids(self.tokenizer, list(observation), ep.tokens[-1] if ep.tokens else None)
        ep.tokens += ids
        ep.loss_mask += [0] * len(ids)
        ep.logprobs += [0.0] * len(ids)
        ep.versions += [-1] * len(ids)
        ep.turn_start = len(ep.tokens)
        return False

    def generate(self, episodes: list[Episode], stop_after_groups: int | None = None,
                 max_engine_steps: int | None = None, keep_going=None) -> tuple[list[Episode], list[Episode]]:
        """Run episodes (new or partial) until all are done, or (APRIL) until `stop_after_groups` groups have
        all their episodes done, or for at most `max_engine_steps` engine steps: what is still running then is
        aborted and returned as partial. `keep_going()`, asked after every engine step once enough groups are
        done, holds the stop off while it answers True (an overlapped round runs on while the trainer trains).
        -> (done or failed, partial)."""
        started = time.perf_counter()
        tokens_before = self.engine.stats.decode_tokens + self.engine.stats.prefill_tokens
        running: dict[str, Episode] = {}
        finished: list[Episode] = []
        # suspended requests these episodes do not continue as they are (restarted, changed by another worker,
        # or not here at all): blocks back, env rebuilt from the episode's tokens if it comes back
        continued = {ep.uid: len(ep.tokens) for ep in episodes if ep.status == "partial"}
        for uid, (request_id, num_tokens) in list(self._suspended.items()):
            if continued.get(uid) != num_tokens:
                del self._suspended[uid]
                self.engine.release(request_id)
                self._forget(uid)
        for ep in episodes:
            try:
                kept = self._suspended.pop(ep.uid, None)
                if kept is not None:
                    self._seqs[kept[0]] = self.engine.resume(kept[0])  # its KV cache is still here
                    self.stats["kv_resumed"] += 1
                    ep.resumed += 1
                    ep.status = "running"
                    running[kept[0]] = ep
                    continue
                self._start(ep)
                if ep.status == "partial":
                    ep.resumed += 1
                ep.status = "running"
                running[self._request(ep)] = ep
            except Exception as err:  # a failing env's reset (or an over-long prompt): this episode only
                self._fail(ep, err)
                finished.append(ep)
        group_left: dict[int, int] = {}
        for ep in episodes:
            group_left[ep.group] = group_left.get(ep.group, 0) + (ep.status == "running")
        done_groups = sum(1 for left in group_left.values() if left == 0)
        steps = 0
        while running and not (stop_after_groups is not None and done_groups >= stop_after_groups
                               and (keep_going is None or not keep_going())):
            if max_engine_steps is not None and steps >= max_engine_steps:
                break
            steps += 1
            for out in self.engine.step():
                ep = running.get(out.request_id)
                if ep is None:
                    continue
                ep.tokens += out.new_token_ids
                ep.loss_mask += [1] * len(out.new_token_ids)
                ep.logprobs += [lp.logprob for lp in out.new_logprobs]
                ep.versions += [self.version] * len(out.new_token_ids)
                if not out.finished:
                    continue
                seq = self._seqs.pop(out.request_id)
                del running[out.request_id]
                ep.generator_state = seq.generator.get_state()
                ep.truncated = out.finish_reason == "length"
                try:
                    episode_done = self._end_turn(ep)
                    if episode_done:
                        self._finish(ep, self.envs.get(ep.uid), out.finish_reason)
                    else:
                        running[self._request(ep)] = ep
                        continue
                except Exception as err:
                    self._fail(ep, err)
                finished.append(ep)
                group_left[ep.group] -= 1
                if group_left[ep.group] == 0:
                    done_groups += 1
        # APRIL: abort the rest; each keeps what it has, and its generator's state
        partial = []
        for request_id, ep in running.items():
            seq = self._seqs.pop(request_id)
            ep.generator_state = seq.generator.get_state()
            ep.status = "partial"
            if self.keep_partial_kv:  # its KV cache and live env wait here for its next call
                self.engine.suspend(request_id)
                self._suspended[ep.uid] = (request_id, len(ep.tokens))
            else:
                self.engine.abort(request_id)
                self._forget(ep.uid)  # rebuilt by replay when continued (maybe by another worker)
            partial.append(ep)
        self.stats["tokens"] += self.engine.stats.decode_tokens + self.engine.stats.prefill_tokens - tokens_before
        self.stats["seconds"] += time.perf_counter() - started
        return finished, partial
