"""The shipped environments: `tool-call`, `calculator`, `countdown` (protocol: glm5/rl/env.py).

    from glm5.rl.envs import ToolCallEnv
    env = ToolCallEnv()
    messages, tools = env.reset(seed=0)     # [{"role": "user", "content": "Weather in Oslo?"}], TOOLS
    obs, reward, done = env.step(glm5.chat.parse_output(model_text, tools))

- tool-call: requests like the demo's (weather, addition, capitals; glm5/train/conversations.py), from the
  training split of requests by default so that the demo's held-out requests stay unseen. Reward for the first
  turn: 1.0 for the exact call (tool and arguments); otherwise partial credit, 0.2 for a well-formed call of
  the right tool plus 0.3 x the share of arguments right. The tool runs on any valid call and its result
  comes back as a tool message; with `final_answer` the next turn earns 0.5 more when its text carries the
  result (the temperature, the sum, the capital). Rewards sum over the episode.
- calculator: arithmetic questions ("What is 37 * 12 + 5?") with a `calculate(expression)` tool; 1.0 when the
  final answer holds the right number, 0.1 for each well-formed tool call (at most once).
- countdown: reach a target from 3-4 numbers with + - * / and parentheses, each number at most once, the
  expression as the answer; 1.0 when it evaluates to the target, 0.1 for an expression that uses only the
  given numbers but misses.
Expressions are evaluated by walking Python's AST (numbers and + - * / only), never with eval().
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re

from glm5.train.conversations import TOOLS, make_task, run_tool

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_arithmetic(expression: str, max_length: int = 200) -> float:
    """The value of an expression of numbers, + - * /, unary minus and parentheses; ValueError otherwise."""
    if not isinstance(expression, str) or len(expression) > max_length:
        raise ValueError("not an expression")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        raise ValueError(f"not an arithmetic expression: {expression!r}")

    return walk(tree)


def _numbers_in(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text or "")]


class ToolCallEnv:
    """One request that needs one tool call, then (with final_answer) the answer from the tool's result."""

    max_turns = 2

    def __init__(self, split: str = "train", final_answer: bool = True):
        if split not in ("train", "eval"):
            raise ValueError(f"split {split!r}: must be train or eval")
        self.split, self.final_answer = split, final_answer
        self.max_turns = 2 if final_answer else 1
        self.task: dict | None = None

    def reset(self, seed: int):
        rng = random.Random(seed)
        self.rng = rng
        self.task = make_task(rng, self.split)
        self.turn = 0
        self.result: dict | None = None
        return [dict(m) for m in self.task["messages"]], TOOLS

    def call_reward(self, turn) -> float:
        """1.0 for the exact call; 0.2 for the right tool (well-formed) + 0.3 x share of right arguments."""
        expected = self.task["expected"]
        calls = [c for c in turn.tool_calls if c.valid]
        if not calls or len(calls) != len(turn.tool_calls):
            return 0.0
        call = calls[0]
        if call.name != expected["name"]:
            return 0.0
        if call.arguments == expected["arguments"]:
            return 1.0
        right = sum(call.arguments.get(k) == v for k, v in expected["arguments"].items())
        return 0.2 + 0.3 * right / max(len(expected["arguments"]), 1)

    def step(self, turn):
        self.turn += 1
        if self.turn == 1:
            reward = self.call_reward(turn)
            calls = [c for c in turn.tool_calls if c.valid]
            if not calls or not self.final_answer:
                return [], reward, True
            call = calls[0]
            try:
                self.result, _ = run_tool(self.rng, call.name, call.arguments)
            except (KeyError, TypeError, ValueError):
                self.result = {"error": "the tool could not run these arguments"}
            return [{"role": "tool", "content": json.dumps(self.result)}], reward, False
        # the answer after the tool result: does it carry the result's value?
        values = [str(v) for v in (self.result or {}).values()]
        text = turn.content or ""
        reward = 0.5 if values and "error" not in (self.result or {}) and all(v in text for v in values[:1]) else 0.0
        return [], reward, True


CALCULATOR_TOOL = {"type": "function", "function": {
    "name": "calculate", "description": "Evaluate an arithmetic expression (+ - * / and parentheses).",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


class CalculatorEnv:
    """Arithmetic with a calculator tool; the answer is the number in the final turn's text."""

    max_turns = 3

    def __init__(self, max_operand: int = 50):
        self.max_operand = max_operand

    def reset(self, seed: int):
        rng = random.Random(seed)
        a, b, c = (rng.randint(2, self.max_operand) for _ in range(3))
        op1, op2 = rng.choice("+-*"), rng.choice("+-")
        self.expression = f"{a} {op1} {b} {op2} {c}"
        self.answer = safe_arithmetic(self.expression)
        self.turn, self.called = 0, False
        ask = rng.choice(["What is {e}?", "Compute {e}.", "Calculate {e}, please."])
        return [{"role": "user", "content": ask.format(e=self.expression)}], [CALCULATOR_TOOL]

    def step(self, turn):
        self.turn += 1
        if turn.tool_calls:
            call = turn.tool_calls[0]
            if not call.valid or call.name != "calculate":
                return [], 0.0, True
            bonus = 0.0 if self.called else 0.1
            self.called = True
            try:
                value = safe_arithmetic(str(call.arguments.get("expression", "")))
                result = {"result": int(value) if float(value).is_integer() else round(value, 6)}
            except ValueError as err:
                result = {"error": str(err)}
            return [{"role": "tool", "content": json.dumps(result)}], bonus, False
        numbers = _numbers_in(turn.content)
        return [], (1.0 if numbers and numbers[-1] == self.answer else 0.0), True


class CountdownEnv:
    """Reach the target with the given numbers (each at most once) and + - * /; answer the expression."""

    max_turns = 1

    def __init__(self, count: int = 3, max_number: int = 20):
        self.count, self.max_number = count, max_number

    def reset(self, seed: int):
        rng = random.Random(seed)
        while True:  # a target some expression of the numbers reaches: built from them
            self.numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
            order = rng.sample(self.numbers, len(self.numbers))
            expression = str(order[0])
            for n in order[1:]:
                expression = f"({expression} {rng.choice('+-*')} {n})"
            target = safe_arithmetic(expression)
            if target > 0 and float(target).is_integer():
                self.target = int(target)
                break
        listed = ", ".join(map(str, self.numbers))
        return [{"role": "user", "content": f"Using the numbers {listed} (each at most once) and + - * /, "
                                             f"write an expression equal to {self.target}."}], None

    def step(self, turn):
        text = (turn.content or "").strip().rstrip(".")
        candidate = text.split("=")[0].strip()
        try:
            value = safe_arithmetic(candidate)
        except ValueError:
            return [], 0.0, True
        used = [int(x) for x in re.findall(r"\d+", candidate)]
        pool = list(self.numbers)
        for n in used:
            if n not in pool:
                return [], 0.0, True
            pool.remove(n)
        return [], (1.0 if abs(value - self.target) < 1e-9 else 0.1), True


__all__ = ["ToolCallEnv", "CalculatorEnv", "CountdownEnv", "safe_arithmetic"]
