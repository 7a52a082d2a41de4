"""`response_format: json_object` by constrained decoding: every token keeps the output a prefix of a JSON object.

A logits processor (the engine calls it with the ids generated so far and the next-token logits) walks the
candidates from the most likely down and keeps those whose text leaves the output a valid prefix of compact
JSON (no whitespace outside strings, so a model cannot pad forever); once the object is complete only the
end-of-text token remains. The check is a small character-level JSON state machine, advanced incrementally.

The object is also finished within `max_tokens`: `closing(state)` is the shortest text that completes the
JSON from a state (`{"a":"x` -> `"}`, `{"a":[1,` -> `null]}`), and a candidate is kept only if, after it, the
tokens left still hold its closing (one token per character at worst: a byte-level vocabulary has every
ASCII character) and the end-of-text token. So with max_tokens >= 3 the answer always ends as a complete
object with finish_reason "stop". (`json_schema` is refused by the server: this enforces no schema.)
`ToolNameProcessor` does the same for tool_choice "required" with several tools: the name must be one of them.
"""

from __future__ import annotations

import re

import torch

# a prefix of a JSON number: digits before '.', a digit after it before any exponent, digits after 'e'
_NUMBER = re.compile(r"-?((0|[1-9][0-9]*)(\.[0-9]*)?((?<=[0-9])[eE][+-]?[0-9]*)?)?")
_LITERALS = ("true", "false", "null")


def _number_ok(text: str) -> bool:
    match = _NUMBER.fullmatch(text)
    return match is not None


def advance(state, ch: str):
    """state = (stack, mode, buf); returns the next state or None when `ch` breaks the JSON prefix."""
    stack, mode, buf = state
    if mode == "string" or mode == "key":
        if buf.startswith("\\u"):  # \uXXXX: exactly four hex digits
            if ch not in "0123456789abcdefABCDEF":
                return None
            return (stack, mode, "" if len(buf) == 5 else buf + ch)
        if buf == "\\":
            if ch == "u":
                return (stack, mode, "\\u")
            return (stack, mode, "") if ch in '"\\/bfnrt' else None
        if ch == "\\":
            return (stack, mode, "\\")
        if ch == '"':
            return (stack, "colon", "") if mode == "key" else (stack, "after", "")
        return None if ord(ch) < 0x20 else state
    if mode == "number":
        if ch in "0123456789+-.eE" and _number_ok(buf + ch):
            return (stack, mode, buf + ch)
        if buf in ("-", "") or buf.endswith(("e", "E", "+", "-", ".")):
            return None
        return advance((stack, "after", ""), ch)
    if mode == "literal":
        for word in _LITERALS:
            if word.startswith(buf + ch):
                return (stack, "after", "") if word == buf + ch else (stack, mode, buf + ch)
        return None
    if mode in ("start", "value"):
        if mode == "start" and ch != "{":
            return None
        if ch == "{":
            return (stack + ("{",), "key_or_end", "")
        if ch == "[":
            return (stack + ("[",), "value_or_end", "")
        if ch == '"':
            return (stack, "string", "")
        if ch in "-0123456789":
            return (stack, "number", ch)
        if any(w.startswith(ch) for w in _LITERALS):
            return (stack, "literal", ch)
        return None
    if mode == "value_or_end":
        if ch == "]":
            return (stack[:-1], "after", "")
        return advance((stack, "value", ""), ch)
    if mode in ("key_or_end", "key_start"):
        if ch == "}" and mode == "key_or_end":
            return (stack[:-1], "after", "")
        return (stack, "key", "") if ch == '"' else None
    if mode == "colon":
        return (stack, "value", "") if ch == ":" else None
    if mode == "after":
        if not stack:
            return None  # complete: nothing may follow
        if ch == ",":
            return (stack, "key_start" if stack[-1] == "{" else "value", "")
        if (ch == "}" and stack[-1] == "{") or (ch == "]" and stack[-1] == "["):
            return (stack[:-1], "after", "")
        return None
    return None


def advance_text(state, text: str):
    for ch in text:
        state = advance(state, ch)
        if state is None:
            return None
    return state


def is_complete(state) -> bool:
    return state is not None and state[1] == "after" and not state[0]


def closing(state) -> str:
    """The shortest text that completes the JSON object from `state` (each character of it, fed in turn, leaves
    a state whose closing is the rest)."""
    stack, mode, buf = state
    closers = "".join("}" if c == "{" else "]" for c in reversed(stack))
    if mode == "start":
        return "{}"
    if mode in ("string", "key"):
        escape = "0" * (6 - len(buf)) if buf.startswith("\\u") else ("n" if buf == "\\" else "")
        return escape + ('":null' if mode == "key" else '"') + closers
    if mode == "number":
        return ("0" if buf in ("-", "") or buf.endswith(("e", "E", "+", "-", ".")) else "") + closers
    if mode == "literal":
        word = next(w for w in _LITERALS if w.startswith(buf))
        return word[len(buf):] + closers
    if mode in ("value", "colon"):
        return (":" if mode == "colon" else "") + "null" + closers
    if mode == "value_or_end":
        return closers
    if mode == "key_or_end":
        return closers
    if mode == "key_start":
        return '"":null' + closers
    return closers  # after


class JSONPrefixProcessor:
    """Keeps one sequence's output a JSON object, complete within `max_tokens` (None: no budget).
    Call with (output token ids, logits [V]) -> logits."""

    def __init__(self, tokenizer, end_ids: set[int], candidates: int = 64, max_tokens: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.end_id = min(end_ids) if end_ids else None
        self.end_ids = end_ids
        self.candidates = candidates
        self.max_tokens = max_tokens
        self.state = ((), "start", "")
        self.seen = 0
        self._texts: dict[int, str] = {}

    def _text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) > self.seen:
            new = [t for t in output_ids[self.seen :] if t not in self.end_ids]
            self.state = advance_text(self.state, self.tokenizer.decode(new)) or self.state
            self.seen = len(output_ids)
        masked = torch.full_like(logits, float("-inf"))
        if is_complete(self.state) and self.end_id is not None:
            masked[self.end_id] = 0.0
            return masked
        # after this token, the tokens left must hold the closing text (a token per character at worst) + the end
        left = None if self.max_tokens is None else self.max_tokens - len(output_ids) - 1
        order = torch.argsort(logits, descending=True).tolist()
        allowed = []
        for token_id in order:
            if token_id in self.end_ids:
                continue
            text = self._text(token_id)
            if not text or "\ufffd" in text:
                continue
            after = advance_text(self.state, text)
            if after is None or (left is not None and len(closing(after)) + 1 > left):
                continue
            allowed.append(token_id)
            if len(allowed) >= self.candidates:
                break
        if not allowed:
            return logits  # nothing fits (a vocabulary without single ASCII characters; max_tokens < 3): leave it be
        index = torch.tensor(allowed, device=logits.device)
        masked[index] = logits[index]
        return masked


class ToolNameProcessor:
    """Holds the output to one of the tool names, then that tool's closing tag (a special token), then steps aside.

    Used for tool_choice "required" with several tools: after the forced `<tool_call>`, the model picks the
    tool. `names` maps each name to the id of the tag that must follow it (`<arg_key>`, or `</tool_call>`
    for a tool without parameters)."""

    stateless = True  # a function of the output ids alone: MTP speculation may run it on drafts

    def __init__(self, tokenizer, names: dict[str, int]) -> None:
        self.tokenizer = tokenizer
        self.names = names
        self.tags = set(names.values())
        self._texts: dict[int, str] = {}

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if any(t in self.tags for t in output_ids):
            return logits  # the name is complete
        text = self.tokenizer.decode(output_ids)
        allowed = [tag for name, tag in self.names.items() if name == text]
        for token_id in torch.argsort(logits, descending=True).tolist():
            piece = self._texts.get(token_id)
            if piece is None:
                piece = self._texts[token_id] = self.tokenizer.decode([token_id])
            if piece and token_id not in self.tags and any(
                    n.startswith(text + piece) for n in self.names):
                allowed.append(token_id)
        if not allowed:
            return logits
        masked = torch.full_like(logits, float("-inf"))
        index = torch.tensor(allowed, device=logits.device)
        masked[index] = logits[index]
        return masked


class ThinkingBudget:
    """Anthropic's thinking budget_tokens: after `budget` reasoning tokens without `</think>`, `</think>` is the only
    choice. A function of the output ids alone (stateless), so MTP speculation stays on."""

    stateless = True

    def __init__(self, close_id: int, budget: int) -> None:
        self.close_id, self.budget = close_id, budget

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) < self.budget or self.close_id in output_ids:
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced[self.close_id] = 0.0
        return forced


class LogitBias:
    """OpenAI's logit_bias: add a fixed bias to the logits of some token ids."""

    stateless = True

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[self.ids.to(logits.device)] += self.values.to(logits.device, logits.dtype)
        return logits
