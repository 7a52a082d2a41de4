"""The shipped envs, the env/reward loading by module:attr and its validation (glm5/rl/env.py, envs.py)."""

import sys
import textwrap

import pytest

from glm5.chat import parse_output
from glm5.rl.env import check_env, check_reward, load_reward, make_env
from glm5.rl.envs import CalculatorEnv, CountdownEnv, ToolCallEnv, safe_arithmetic


def call_text(name, arguments):
    return ("</think><tool_call>" + name
            + "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in arguments.items())
            + "</tool_call>")


def test_tool_call_rewards_exact_call_partial_credit_and_the_final_answer():
    env = ToolCallEnv()
    messages, tools = env.reset(7)
    expected = env.task["expected"]
    assert messages[0]["role"] == "user" and tools
    obs, reward, done = env.step(parse_output(call_text(expected["name"], expected["arguments"]), tools))
    assert reward == 1.0 and not done and obs[0]["role"] == "tool"
    value = next(iter(env.result.values()))
    _, reward, done = env.step(parse_output(f"</think>The answer is {value}.", tools))
    assert reward == 0.5 and done
    # right tool, every argument wrong: 0.2; half the arguments right: 0.2 + 0.15
    env.reset(7)
    wrong = {k: ("Nowhere" if isinstance(v, str) else v + 1) for k, v in expected["arguments"].items()}
    _, reward, _ = env.step(parse_output(call_text(expected["name"], wrong), tools))
    assert reward == pytest.approx(0.2)
    # no call at all: 0 and the episode ends
    env.reset(7)
    obs, reward, done = env.step(parse_output("</think>I do not know.", tools))
    assert (obs, reward, done) == ([], 0.0, True)


def test_tool_call_partial_credit_per_argument():
    env = ToolCallEnv()
    for seed in range(200):
        env.reset(seed)
        if env.task["expected"]["name"] == "add":
            break
    args = dict(env.task["expected"]["arguments"])
    args["b"] += 1
    _, reward, _ = env.step(parse_output(call_text("add", args), env.reset(seed)[1]))
    assert reward == pytest.approx(0.2 + 0.3 * 0.5)


def test_train_split_requests_are_not_the_eval_ones():
    from glm5.train.conversations import split_of

    env = ToolCallEnv()
    assert all(split_of(env.reset(s)[0][0]["content"]) == "train" for s in range(50))


def test_calculator_multi_turn():
    env = CalculatorEnv()
    messages, tools = env.reset(3)
    obs, reward, done = env.step(parse_output(call_text("calculate", {"expression": env.expression}), tools))
    assert reward == pytest.approx(0.1) and not done
    assert str(int(env.answer)) in obs[0]["content"]
    _, reward, done = env.step(parse_output(f"</think>It is {int(env.answer)}.", tools))
    assert reward == 1.0 and done
    env.reset(3)
    _, reward, done = env.step(parse_output(f"</think>It is {int(env.answer) + 1}.", tools))
    assert reward == 0.0 and done


def test_countdown_checks_value_and_numbers():
    env = CountdownEnv()
    env.reset(0)
    env.numbers, env.target = [3, 5, 7], 22
    assert env.step(parse_output("</think>3 * 5 + 7"))[1] == 1.0
    assert env.step(parse_output("</think>3 + 5 + 7"))[1] == 0.1  # only given numbers, wrong value
    assert env.step(parse_output("</think>3 * 5 + 7 + 7"))[1] == 0.0  # 7 used twice
    assert env.step(parse_output("</think>__import__('os')"))[1] == 0.0


def test_safe_arithmetic_refuses_anything_but_arithmetic():
    assert safe_arithmetic("(2 + 3) * -4 / 2") == -10
    for bad in ("2 ** 100", "abs(-1)", "x + 1", "1 / 0", "'a' * 3"):
        with pytest.raises(ValueError):
            safe_arithmetic(bad)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rl_plugin.py").write_text(textwrap.dedent("""
        class EchoEnv:
            max_turns = 1
            def reset(self, seed):
                self.word = "w%d" % seed
                return [{"role": "user", "content": "say " + self.word}], None
            def step(self, turn):
                return [], float(self.word in (turn.content or "")), True

        def score(messages, env):
            return 2.0

        def broken(messages, env):
            raise RuntimeError("no")

        def wrong_arity(messages):
            return 1.0

        NOT_AN_ENV = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rl_plugin"
    sys.modules.pop("my_rl_plugin", None)


def test_user_env_and_reward_load_by_module_attr(user_module):
    env = make_env(f"{user_module}:EchoEnv")
    check_env(env, "x")
    messages, _ = env.reset(4)
    assert env.step(parse_output("</think>w4"))[1] == 1.0
    fn = load_reward(f"{user_module}:score")
    check_reward(fn, env, "x")
    assert fn(messages, env) == 2.0


def test_bad_envs_and_rewards_are_one_line_errors(user_module):
    with pytest.raises(ValueError, match="unknown; shipped: tool-call, calculator, countdown"):
        make_env("nope")
    with pytest.raises(ValueError, match="cannot import"):
        make_env("no_such_module_xyz:Env")
    with pytest.raises(ValueError, match="no attribute"):
        make_env(f"{user_module}:Missing")
    with pytest.raises(ValueError, match="not a class or factory"):
        make_env(f"{user_module}:NOT_AN_ENV")
    with pytest.raises(ValueError, match="must take"):
        load_reward(f"{user_module}:wrong_arity")
    env = make_env(f"{user_module}:EchoEnv")
    with pytest.raises(ValueError, match="raised RuntimeError"):
        check_reward(load_reward(f"{user_module}:broken"), env, "x")
