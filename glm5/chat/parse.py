"""Parse GLM-5's output into reasoning, content and tool calls: all at once, or streamed piece by piece.

    from glm5.chat import parse_output, StreamingParser
    result = parse_output("Let me look.</think>Checking.<tool_call>get_weather"
                          "<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>", tools)
    result.reasoning, result.content, result.tool_calls[0].arguments
    # ('Let me look.', 'Checking.', {'city': 'Paris'})

    parser = StreamingParser(tools)
    for piece in decoded_pieces:
        for event in parser.feed(piece): ...     # ReasoningDelta, ContentDelta, ToolCallStart (the name),
    last_events = parser.close()                 # ToolCallArgumentsDelta (JSON fragments), ToolCallEnd
    result = parser.finish()                     # == parse_output(whole text), for any split

The text is what the model wrote after the prompt, without the stop token. With thinking=True (the
prompt ended in `<think>`) it starts inside the reasoning, which runs to the first `</think>`; a leading
`<think>` is accepted either way. Reasoning and content come back stripped of surrounding whitespace,
as `render_messages` writes them, so render(parse(x)) reproduces x.

Malformed output never raises. Every decision is one a streaming client can already have seen:
- reasoning never closed: it is all reasoning (the model was cut off while thinking), unless a
  `<tool_call>` comes first, which ends the reasoning (GLM-5 does not call tools while thinking);
- a stray `<think>`/`</think>` later on, text after a tool call: content;
- an unclosed `<tool_call>`, an unknown tool, a key not in the schema, a value that is not valid JSON
  for a non-string type, a missing required argument: a ToolCall with valid=False and `error` saying why.
Three slips GLM models make are recovered, since the intent is unambiguous: the first `<arg_key>` left out
(`<tool_call>get_weathercity</arg_key>...`: split at the longest known tool name), an `<arg_value>` left out
(`<arg_key>city</arg_key>Oslo</arg_value>`), and an `<arg_key>` left out where the tool has one parameter
still unset (`<tool_call>get_time<arg_value>UTC</arg_value>`).
Argument values are typed by the tool's JSON schema: `string` raw, other types through json.loads with
the raw string as the fallback; with no schema, JSON that decodes to a non-string is used, else the raw text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


# ---- results and events -------------------------------------------------------------------------------
@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    valid: bool = True
    error: str | None = None  # why the call is invalid (the first problem found)
    index: int = 0  # position among this output's tool calls

    @property
    def arguments_json(self) -> str:
        """The arguments as an OpenAI client expects them: a JSON string."""
        return json.dumps(self.arguments, ensure_ascii=False)

    def to_openai(self, call_id: str) -> dict:
        return {"id": call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_json}}


@dataclass
class ParsedOutput:
    reasoning: str | None
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_message(self) -> dict:
        """An OpenAI assistant message; reasoning under both names clients use."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            message["reasoning_content"] = message["reasoning"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [call.to_openai(f"call_{call.index}") for call in self.tool_calls]
        return message


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    name: str


@dataclass(frozen=True)
class ToolCallArgumentsDelta:
    """A fragment of the call's arguments as JSON; a call's fragments join to `ToolCall.arguments_json`
    (when no key repeats)."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    call: ToolCall


Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgumentsDelta | ToolCallEnd


# ---- tool schemas --------------------------------------------------------------------------------------
def tool_schemas(tools: Sequence[Mapping] | None) -> dict[str, Mapping] | None:
    """name -> JSON schema of the parameters, from OpenAI tools (envelope or bare); None if no tools."""
    if not tools:
        return None
    schemas = {}
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            parameters = function.get("parameters")
            schemas[function["name"]] = parameters if isinstance(parameters, Mapping) else {}
    return schemas


def _schema_types(schema: Any) -> set[str]:
    """The JSON types a property schema allows ({} when it does not say)."""
    if not isinstance(schema, Mapping):
        return set()
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {t for t in declared if isinstance(t, str)}
    types: set[str] = set()
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or []:
            types |= _schema_types(option)
    if not types and "enum" in schema and all(isinstance(v, str) for v in schema["enum"] or [None]):
        types = {"string"}
    return types


def _has_type(value: Any, types: set[str]) -> bool:
    """Whether a decoded JSON value is one of the JSON Schema types (True when types is empty)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    checks = {"string": isinstance(value, str), "null": value is None, "boolean": isinstance(value, bool),
              "number": number, "integer": number and float(value).is_integer(),
              "array": isinstance(value, list), "object": isinstance(value, dict)}
    return not types or any(checks.get(t, True) for t in types)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# ---- helpers -------------------------------------------------------------------------------------------
class _TrimmedText:
    """Streams text with its leading and trailing whitespace removed: trailing whitespace is held back
    until more text shows it was inner whitespace. The deltas join to (all text pushed).strip()."""

    def __init__(self):
        self.started = False
        self.pending_whitespace = ""
        self.pieces: list[str] = []

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.pending_whitespace += text
            return ""
        delta = self.pending_whitespace + body
        self.pending_whitespace = text[len(body):]
        self.pieces.append(delta)
        return delta

    def text(self) -> str:
        return "".join(self.pieces)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"
_CALL_TAGS = (CALL_OPEN, CALL_CLOSE, KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE)

# states; each watches for its own set of tags
START, REASONING, CONTENT, NAME, BETWEEN, KEY, AFTER_KEY, VALUE = range(8)
_TAGS = {
    REASONING: (THINK_CLOSE, CALL_OPEN),  # GLM-5 never calls tools while thinking: a call ends it
    CONTENT: (CALL_OPEN,),
    NAME: _CALL_TAGS,
    BETWEEN: _CALL_TAGS,
    KEY: _CALL_TAGS,
    AFTER_KEY: _CALL_TAGS,
    VALUE: (VALUE_CLOSE, CALL_CLOSE),  # a value may hold any text, even tag-like text
}
_PATTERNS = {state: re.compile("|".join(map(re.escape, tags))) for state, tags in _TAGS.items()}


def _partial_tag_start(buffer: str, start: int, tags: tuple[str, ...]) -> int:
    """Index where a possible unfinished tag begins at the end of buffer[start:], or len(buffer).

    Every tag has exactly one '<', at its start, so only the last '<' can begin one."""
    at = buffer.rfind("<", max(start, len(buffer) - 12))
    if at >= 0 and any(tag.startswith(buffer[at:]) for tag in tags):
        return at
    return len(buffer)


class _OpenCall:
    def __init__(self, index: int):
        self.index = index
        self.name_text = ""
        self.name = ""
        self.schema: Mapping | None = None  # the tool's parameters schema when known
        self.arguments: dict[str, Any] = {}
        self.error: str | None = None
        self.fragments_sent = 0  # arguments already written into the JSON stream
        self.stray = ""  # text between tags where only whitespace belongs
        self.key_text = ""
        self.key: str | None = None
        self.value_text = ""
        self.streaming_value = False

    def flag(self, reason: str) -> None:
        if self.error is None:
            self.error = reason


# ---- the parser ----------------------------------------------------------------------------------------
class StreamingParser:
    """Incremental parser of GLM-5 output: `feed` text pieces, then `close` and `finish`."""

    def __init__(self, tools: Sequence[Mapping] | None = None, *, thinking: bool = True, tool_calls: bool = True):
        self.schemas = tool_schemas(tools)
        self.thinking = thinking
        # tool_calls=False (the request has tools off): `<tool_call>` is ordinary text, kept in the output
        self.tags = _TAGS if tool_calls else {**_TAGS, REASONING: (THINK_CLOSE,), CONTENT: ()}
        self.patterns = {state: re.compile("|".join(map(re.escape, tags))) if tags else None
                         for state, tags in self.tags.items()}
        self.state = START
        self.buffer = ""
        self.position = 0  # buffer[:position] is consumed
        self.saw_reasoning = False
        self.reasoning = _TrimmedText()
        self.content = _TrimmedText()
        self.calls: list[ToolCall] = []
        self.call: _OpenCall | None = None
        self.closed = False
        self.events: list[Event] = []

    # ---- public -------------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        """Consume the next piece of output; return what it completed."""
        if self.closed:
            raise RuntimeError("feed() after close()")
        self.buffer = self.buffer[self.position:] + text
        self.position = 0
        self._run(final=False)
        events, self.events = self.events, []
        return events

    def close(self) -> list[Event]:
        """The output has ended: flush held-back text, end an open tool call (flagged). Idempotent."""
        if self.closed:
            return []
        self._run(final=True)
        self.closed = True
        if self.state in (NAME, BETWEEN, KEY, AFTER_KEY, VALUE):
            self.call.flag("unclosed <tool_call>: the output ended inside it")
            self._end_call()
        events, self.events = self.events, []
        return events

    def finish(self) -> ParsedOutput:
        """The parse of everything fed (closing first if needed)."""
        self.close()
        reasoning = self.reasoning.text() if self.saw_reasoning else ""
        return ParsedOutput(reasoning=reasoning or None, content=self.content.text(), tool_calls=list(self.calls))

    # ---- the scanning loop --------------------------------------------------------------------------
    def _run(self, final: bool) -> None:
        buffer = self.buffer
        while True:
            if self.state == START:
                if not self._start(final):
                    return
                continue
            pattern = self.patterns[self.state]
            match = pattern.search(buffer, self.position) if pattern else None
            if match:
                self._text(buffer[self.position:match.start()])
                self.position = match.end()
                self._tag(match.group())
                continue
            stop = len(buffer) if final else _partial_tag_start(buffer, self.position, self.tags[self.state])
            self._text(buffer[self.position:stop])
            self.position = stop
            return

    def _start(self, final: bool) -> bool:
        """Decide whether the output opens with `<think>`; False while that is still unknown."""
        rest = self.buffer[self.position:]
        head = rest.lstrip()
        if head.startswith(THINK_OPEN):
            self.position += len(rest) - len(head) + len(THINK_OPEN)
            self.state = REASONING
        elif not final and THINK_OPEN.startswith(head):  # "", "<", "<thi": wait for more
            return False
        else:
            self.state = REASONING if self.thinking else CONTENT
        if self.state == REASONING:
            self.saw_reasoning = True
        return True

    # ---- text between tags --------------------------------------------------------------------------
    def _text(self, text: str) -> None:
        if not text:
            return
        state = self.state
        if state == REASONING:
            delta = self.reasoning.push(text)
            if delta:
                self.events.append(ReasoningDelta(delta))
        elif state == CONTENT:
            delta = self.content.push(text)
            if delta:
                self.events.append(ContentDelta(delta))
        elif state == NAME:
            self.call.name_text += text
        elif state == KEY:
            self.call.key_text += text
        elif state == VALUE:
            self.call.value_text += text
            if self.call.streaming_value:
                self._arguments_delta(json.dumps(text, ensure_ascii=False)[1:-1])
        else:  # BETWEEN, AFTER_KEY: only whitespace belongs here
            self.call.stray += text

    # ---- tags ---------------------------------------------------------------------------------------
    def _tag(self, tag: str) -> None:
        state = self.state
        if state == REASONING:
            self.state = CONTENT
            if tag == CALL_OPEN:  # `</think>` left out before a tool call
                self._open_call()
        elif state == CONTENT:  # <tool_call>
            self._open_call()
        elif state == VALUE:
            self._end_argument()
            self.state = BETWEEN
            if tag == CALL_CLOSE:
                self.call.flag("unclosed <arg_value> before </tool_call>")
                self._end_call()
        else:
            if state == NAME:
                if tag == KEY_CLOSE and self._split_name_and_key():
                    return
                self._end_name()
            self._call_tag(tag)

    def _split_name_and_key(self) -> bool:
        """`<tool_call>get_weathercity</arg_key>`: the model left out the first `<arg_key>`, so the name runs into
        the key. When the text starts with a known tool's name (the longest, preferring one whose rest is one of
        its parameters), split it there; the name is not streamed before this, so no client saw the wrong one."""
        call, text = self.call, self.call.name_text.strip()
        candidates = []
        for name, schema in (self.schemas or {}).items():
            rest = text[len(name):].strip()
            if text.startswith(name) and rest:
                properties = schema.get("properties") if isinstance(schema, Mapping) else None
                candidates.append((isinstance(properties, Mapping) and rest in properties, len(name), name, rest))
        if not candidates:
            return False
        _, _, name, rest = max(candidates)
        call.name_text = name
        self._end_name()
        call.key = rest
        self.state = AFTER_KEY
        return True

    def _call_tag(self, tag: str) -> None:
        """A tag inside a tool call, after its name: what it means depends on what came before."""
        call, state = self.call, self.state
        if tag == VALUE_CLOSE and state == AFTER_KEY and call.stray.strip():
            # `<arg_key>k</arg_key>v</arg_value>`: the `<arg_value>` was left out; the text before the close is the value
            call.value_text, call.streaming_value, call.stray = call.stray.strip(), False, ""
            self._end_argument()
            self.state = BETWEEN
            return
        if call.stray.strip():
            call.flag(f"unexpected text in tool call: {call.stray.strip()[:40]!r}")
        call.stray = ""
        if tag == CALL_CLOSE:
            if state == KEY:
                call.flag(f"argument key {call.key_text.strip()!r} has no value")
            elif state == AFTER_KEY:
                call.flag(f"argument {call.key!r} has no value")
            self._end_call()
        elif tag == CALL_OPEN:
            call.flag("unclosed <tool_call>: another began inside it")
            self._end_call()
            self._open_call()
        elif tag == KEY_OPEN:
            if state in (KEY, AFTER_KEY):
                call.flag("argument key without a value")
            call.key_text = ""
            self.state = KEY
        elif tag == KEY_CLOSE:
            if state == KEY:
                call.key = call.key_text.strip()
                self.state = AFTER_KEY
            else:
                call.flag("</arg_key> without <arg_key>")
        elif tag == VALUE_OPEN:
            if state == KEY:  # </arg_key> missing: take the key anyway
                call.flag("unclosed <arg_key>")
                call.key = call.key_text.strip()
            elif state == BETWEEN:
                unset = [k for k in self._properties() if k not in call.arguments]
                if len(unset) == 1:  # `<arg_key>` left out where only one parameter can be meant: that one
                    call.key = unset[0]
                else:
                    call.flag("<arg_value> without an <arg_key>")
                    call.key = None  # the value is read and dropped
            self._begin_value()
        else:  # VALUE_CLOSE outside a value
            call.flag("</arg_value> without <arg_value>")

    # ---- tool-call bookkeeping ----------------------------------------------------------------------
    def _open_call(self) -> None:
        self.call = _OpenCall(len(self.calls))
        self.state = NAME

    def _end_name(self) -> None:
        call = self.call
        call.name = call.name_text.strip()
        if not call.name:
            call.flag("tool call without a name")
        elif self.schemas is not None:
            if call.name in self.schemas:
                call.schema = self.schemas[call.name]
            else:
                call.flag(f"unknown tool {call.name!r}")
        self.state = BETWEEN
        self.events.append(ToolCallStart(call.index, call.name))

    def _properties(self) -> list[str]:
        schema = self.call.schema
        properties = schema.get("properties") if isinstance(schema, Mapping) else None
        return list(properties) if isinstance(properties, Mapping) else []

    def _property_schema(self, key: str) -> Any:
        schema = self.call.schema
        properties = schema.get("properties") if isinstance(schema, Mapping) else None
        if not isinstance(properties, Mapping):
            return None
        if key not in properties:
            if schema.get("additionalProperties") in (None, False):
                self.call.flag(f"argument {key!r} is not in the schema of {self.call.name!r}")
            return None
        return properties[key]

    def _begin_value(self) -> None:
        call = self.call
        call.value_text = ""
        call.streaming_value = False
        self.state = VALUE
        if call.key is not None and _schema_types(self._property_schema(call.key)) == {"string"}:
            # a string is taken raw, so it can be streamed as it arrives rather than at </arg_value>
            call.streaming_value = True
            self._arguments_delta(self._argument_prefix(call.key) + '"')

    def _end_argument(self) -> None:
        call = self.call
        raw, key = call.value_text, call.key
        call.key = None
        if key is None:
            return
        if call.streaming_value:
            call.arguments[key] = raw
            self._arguments_delta('"')
            return
        value = self._typed_value(key, raw)
        call.arguments[key] = value
        self._arguments_delta(self._argument_prefix(key) + json.dumps(value, ensure_ascii=False))

    def _typed_value(self, key: str, raw: str) -> Any:
        types = _schema_types(self._property_schema(key)) if self.call.schema is not None else set()
        if types == {"string"}:
            return raw
        try:
            value = json.loads(raw, parse_constant=_reject_constant)  # no NaN/Infinity: clients' JSON rejects them
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            if types and "string" not in types:
                self.call.flag(f"argument {key!r} is not valid JSON for type {'/'.join(sorted(types))}")
            return raw
        if not types and isinstance(value, str):
            return raw  # no schema: a quoted string stays as written
        if not _has_type(value, types):
            if "string" in types:
                return raw  # e.g. "42" for a string-or-null key: the text is the string
            self.call.flag(f"argument {key!r} is not of type {'/'.join(sorted(types))}")
        return value

    def _argument_prefix(self, key: str) -> str:
        call = self.call
        prefix = "{" if call.fragments_sent == 0 else ", "
        call.fragments_sent += 1
        return prefix + json.dumps(key, ensure_ascii=False) + ": "

    def _arguments_delta(self, text: str) -> None:
        if text:
            self.events.append(ToolCallArgumentsDelta(self.call.index, text))

    def _end_call(self) -> None:
        call = self.call
        if call.stray.strip():
            call.flag(f"unexpected text in tool call: {call.stray.strip()[:40]!r}")
        if self.state == NAME:
            self._end_name()
        elif self.state == VALUE:
            self._end_argument()
        if call.schema is not None and call.error is None:
            required = call.schema.get("required") if isinstance(call.schema, Mapping) else None
            missing = [k for k in required or [] if isinstance(k, str) and k not in call.arguments]
            if missing:
                call.flag(f"missing required argument {missing[0]!r}")
        self._arguments_delta("{}" if call.fragments_sent == 0 else "}")
        result = ToolCall(call.name, call.arguments, valid=call.error is None, error=call.error, index=call.index)
        self.calls.append(result)
        self.events.append(ToolCallEnd(call.index, result))
        self.call = None
        self.state = CONTENT


def parse_output(text: str, tools: Sequence[Mapping] | None = None, *, thinking: bool = True) -> ParsedOutput:
    """Reasoning, content and tool calls of a complete model output (see the module docstring)."""
    parser = StreamingParser(tools, thinking=thinking)
    parser.feed(text)
    return parser.finish()
