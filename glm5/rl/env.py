"""The environment protocol, the reward hook, and loading either by name or by `module:attr`.

    from glm5.rl.env import make_env, load_reward
    env = make_env("tool-call")                 # a shipped env, or "my_pkg.envs:MyEnv" (a class or a factory)
    messages, tools = env.reset(seed=3)         # OpenAI-style messages and tools: the episode's prompt
    observation, reward, done = env.step(parsed_turn)   # parsed_turn: glm5.chat.ParsedOutput of one assistant turn
    score = load_reward("my_pkg.rewards:score")  # score(messages, env) -> float, replaces the env's reward sum

An environment is any object with
    reset(seed: int) -> (messages: list[dict], tools: list[dict] | None)
    step(turn: ParsedOutput) -> (observation: list[dict], reward: float, done: bool)
and optionally `max_turns` (assistant turns before the episode is cut; default 4) and `max_new_tokens` (this
task's token budget per turn, set by reset; at most the run's --max-new-tokens). `observation` holds the
messages that follow the assistant's turn (tool results as {"role": "tool", ...}, or a user message); the
rollout renders them with GLM-5's chat format and appends their tokens. The episode's reward is the sum of the
step rewards, unless a reward function is given: it is called once, when the episode ends, with the whole
conversation (the prompt, each assistant turn as parsed, each observation) and the env.

This is how glm5 is adapted to a domain: write an env (your tools, your checker) and pass
`glm5 rl --env my_pkg.envs:MyEnv` (and/or `--reward my_pkg.rewards:score`).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Env(Protocol):
    def reset(self, seed: int) -> tuple[list[dict], list[dict] | None]: ...

    def step(self, turn: Any) -> tuple[list[dict], float, bool]: ...


def load_object(spec: str, what: str) -> Any:
    """`package.module:attr` -> the attribute; ValueError in one line when the module or attr is missing."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"{what} {spec!r}: expected a shipped name or module:attr (e.g. my_pkg.envs:MyEnv)")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or anything the user's module raises while importing
        raise ValueError(f"{what} {spec!r}: cannot import {module_name}: {type(err).__name__}: {err}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def shipped_envs() -> dict:
    from glm5.rl.envs import CalculatorEnv, CountdownEnv, ToolCallEnv

    return {"tool-call": ToolCallEnv, "calculator": CalculatorEnv, "countdown": CountdownEnv}


def make_env(spec: str, **kwargs) -> Env:
    """A fresh env from a shipped name or `module:attr` (a class or a zero-argument factory); checked to have
    callable reset and step, and reset(0) must return (messages, tools)."""
    envs = shipped_envs()
    if spec in envs:
        factory = envs[spec]
    elif ":" in spec:
        factory = load_object(spec, "--env")
    else:
        raise ValueError(f"--env {spec!r}: unknown; shipped: {', '.join(envs)}, or give module:attr")
    if not callable(factory):
        raise ValueError(f"--env {spec!r}: not a class or factory (got {type(factory).__name__})")
    try:
        env = factory(**kwargs)
    except Exception as err:
        raise ValueError(f"--env {spec!r}: constructing it failed: {type(err).__name__}: {err}") from None
    for method in ("reset", "step"):
        if not callable(getattr(env, method, None)):
            raise ValueError(f"--env {spec!r}: has no {method}() method (an env needs reset(seed) and step(turn))")
    return env


def check_env(env: Env, spec: str) -> None:
    """reset(0) of a new env returns (messages, tools) with a user message: refuse it now, not mid-run."""
    try:
        result = env.reset(0)
    except Exception as err:
        raise ValueError(f"--env {spec!r}: reset(0) raised {type(err).__name__}: {err}") from None
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], list) and result[0]
            and all(isinstance(m, dict) and "role" in m for m in result[0])):
        raise ValueError(f"--env {spec!r}: reset(seed) must return (messages, tools) with a non-empty list of "
                         f"messages, got {type(result).__name__}")
    if result[1] is not None and not isinstance(result[1], list):
        raise ValueError(f"--env {spec!r}: reset(seed)'s tools must be a list or None")


def load_reward(spec: str | None):
    """A reward function `score(messages, env) -> float` from module:attr (None: the env's own rewards)."""
    if spec is None:
        return None
    fn = load_object(spec, "--reward")
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: not callable (got {type(fn).__name__})")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise ValueError(f"--reward {spec!r}: must take (messages, env); its signature is {inspect.signature(fn)}") from None
    except ValueError:  # builtins without a signature: let the first call tell
        pass
    return fn


def check_reward(fn, env: Env, spec: str) -> None:
    """Call the reward once on env.reset(0)'s prompt: a reward that raises or returns a non-number is refused
    before the run starts."""
    if fn is None:
        return
    messages, _ = env.reset(0)
    try:
        value = fn(list(messages), env)
    except Exception as err:
        raise ValueError(f"--reward {spec!r}: raised {type(err).__name__}: {err} on a sample episode") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"--reward {spec!r}: must return a number, got {value!r}")
