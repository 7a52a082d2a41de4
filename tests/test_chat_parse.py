"""Parsing GLM-5 output: reasoning, content, typed tool calls; streaming equals one-shot for every split;
malformed output never raises.

    .venv/bin/python -m pytest -q tests/test_chat_parse.py            # the 10k-input fuzz is marked slow
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5.chat import (
    ContentDelta,
    ReasoningDelta,
    StreamingParser,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
    parse_output,
)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city"],
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
                       "coords": {"type": "array"}, "opts": {"type": "object"},
                       "note": {"type": ["string", "null"]}, "unit": {"enum": ["c", "f"]}}}}},
    {"name": "open_tab", "parameters": {"type": "object", "properties": {"url": {"type": "string"}},
                                        "additionalProperties": True}},
]


def call_text(name, *pairs):
    return f"<tool_call>{name}" + "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in pairs) + \
        "</tool_call>"


# ---- one-shot parsing -------------------------------------------------------------------------------
def test_reasoning_then_content():
    result = parse_output("  I should greet.\n</think>\n\nHello there!  ")
    assert (result.reasoning, result.content, result.tool_calls) == ("I should greet.", "Hello there!", [])


def test_without_thinking_everything_is_content_and_reasoning_is_none():
    result = parse_output("Hello </think> there", thinking=False)
    assert (result.reasoning, result.content) == (None, "Hello </think> there")


def test_a_leading_think_tag_is_accepted_in_both_modes():
    for thinking in (True, False):
        result = parse_output("\n<think>plan</think>answer", thinking=thinking)
        assert (result.reasoning, result.content) == ("plan", "answer"), f"thinking={thinking}"


def test_empty_reasoning_is_none():
    assert parse_output("</think>just content").reasoning is None


def test_arguments_are_typed_by_the_schema():
    text = "</think>" + call_text("get_weather", ("city", "123"), ("days", "3"), ("metric", "true"),
                                  ("coords", "[1.5, 2]"), ("opts", '{"a": {"b": null}}'), ("note", "null"),
                                  ("unit", "c"))
    (tool_call,) = parse_output(text, TOOLS).tool_calls
    assert tool_call.valid, tool_call.error
    assert tool_call.arguments == {"city": "123", "days": 3, "metric": True, "coords": [1.5, 2],
                                   "opts": {"a": {"b": None}}, "note": None, "unit": "c"}


def test_string_values_are_raw_even_when_they_look_like_json_or_have_spaces():
    text = "</think>" + call_text("get_weather", ("city", ' "New York"\n'))
    assert parse_output(text, TOOLS).tool_calls[0].arguments == {"city": ' "New York"\n'}


def test_without_schema_json_values_decode_and_strings_stay_raw():
    text = "</think>" + call_text("anything", ("n", "42"), ("s", "plain text"), ("q", '"quoted"'), ("o", "[1]"))
    (tool_call,) = parse_output(text).tool_calls
    assert tool_call.valid and tool_call.arguments == {"n": 42, "s": "plain text", "q": '"quoted"', "o": [1]}


def test_several_calls_with_content_before_them():
    text = "ok</think>Checking both." + call_text("get_weather", ("city", "Oslo")) + \
        call_text("open_tab", ("url", "https://x.org"), ("extra", "1"))
    result = parse_output(text, TOOLS)
    assert result.content == "Checking both."
    assert [(c.name, c.arguments, c.valid, c.index) for c in result.tool_calls] == [
        ("get_weather", {"city": "Oslo"}, True, 0), ("open_tab", {"url": "https://x.org", "extra": 1}, True, 1)]


def test_glm45_style_newlines_between_tags_are_tolerated():
    text = "</think><tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>"
    (tool_call,) = parse_output(text, TOOLS).tool_calls
    assert (tool_call.name, tool_call.arguments, tool_call.valid) == ("get_weather", {"city": "Rome"}, True)


def test_to_message_gives_an_openai_message_with_both_reasoning_fields():
    message = parse_output("r</think>c" + call_text("get_weather", ("city", "Oslo")), TOOLS).to_message()
    assert message["reasoning_content"] == message["reasoning"] == "r"
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


# ---- malformed output degrades, never raises --------------------------------------------------------
@pytest.mark.parametrize("text, reasoning, content, calls", [
    # reasoning never closed: the model was cut off while thinking
    ("still thinking about it", "still thinking about it", "", []),
    # a tool call with no </think> before it ends the reasoning
    ("plan<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>", "plan", "",
     [("get_weather", {"city": "Oslo"}, None)]),
    # unclosed tool call
    ("</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Par", None, "",
     [("get_weather", {"city": "Par"}, "unclosed <tool_call>: the output ended inside it")]),
    ("</think>text<tool_call>get_wea", None, "text",
     [("get_wea", {}, "unclosed <tool_call>: the output ended inside it")]),
    # unknown tool
    ("</think>" + call_text("launch_rocket", ("when", "now")), None, "",
     [("launch_rocket", {"when": "now"}, "unknown tool 'launch_rocket'")]),
    # key not in the schema
    ("</think>" + call_text("get_weather", ("city", "Oslo"), ("colour", "red")), None, "",
     [("get_weather", {"city": "Oslo", "colour": "red"}, "argument 'colour' is not in the schema of 'get_weather'")]),
    # invalid JSON for a non-string type: the raw string, flagged
    ("</think>" + call_text("get_weather", ("city", "Oslo"), ("days", "three")), None, "",
     [("get_weather", {"city": "Oslo", "days": "three"}, "argument 'days' is not valid JSON for type integer")]),
    # missing required argument
    ("</think>" + call_text("get_weather", ("days", "2")), None, "",
     [("get_weather", {"days": 2}, "missing required argument 'city'")]),
    # text after a tool call is content
    ("</think>Before." + call_text("get_weather", ("city", "Oslo")) + " After.", None, "Before. After.",
     [("get_weather", {"city": "Oslo"}, None)]),
    # stray think tags later on are content
    ("r</think>a <think>b</think> c", "r", "a <think>b</think> c", []),
    # a value never closed before </tool_call>
    ("</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</tool_call>", None, "",
     [("get_weather", {"city": "Oslo"}, "unclosed <arg_value> before </tool_call>")]),
    # a key with no value
    ("</think><tool_call>get_weather<arg_key>city</arg_key></tool_call>", None, "",
     [("get_weather", {}, "argument 'city' has no value")]),
    # a value with no key is dropped
    ("</think><tool_call>get_weather<arg_value>Oslo</arg_value></tool_call>", None, "",
     [("get_weather", {}, "<arg_value> without an <arg_key>")]),
    # junk between arguments
    ("</think><tool_call>get_weather junk? <arg_key>city</arg_key>x<arg_value>Oslo</arg_value></tool_call>", None, "",
     [("get_weather junk?", {"city": "Oslo"}, "unknown tool 'get_weather junk?'")]),
    ("</think><tool_call>get_weather<arg_key>city</arg_key>x<arg_value>Oslo</arg_value></tool_call>", None, "",
     [("get_weather", {"city": "Oslo"}, "unexpected text in tool call: 'x'")]),
    # a second call opened inside the first
    ("</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>A</arg_value><tool_call>get_weather"
     "<arg_key>city</arg_key><arg_value>B</arg_value></tool_call>", None, "",
     [("get_weather", {"city": "A"}, "unclosed <tool_call>: another began inside it"),
      ("get_weather", {"city": "B"}, None)]),
    # a nameless call
    ("</think><tool_call></tool_call>", None, "", [("", {}, "tool call without a name")]),
    # closing tags out of place
    ("</think></tool_call></arg_value>", None, "</tool_call></arg_value>", []),
    ("", None, "", []),
])
def test_malformed_output_degrades_to_content_or_a_flagged_call(text, reasoning, content, calls):
    result = parse_output(text, TOOLS)
    assert (result.reasoning, result.content) == (reasoning, content)
    got = [(c.name, c.arguments, c.error) for c in result.tool_calls]
    assert got == calls
    assert all(c.valid == (c.error is None) for c in result.tool_calls)


# ---- streaming --------------------------------------------------------------------------------------
def stream(text, splits, tools=TOOLS, thinking=True):
    parser = StreamingParser(tools, thinking=thinking)
    events, start = [], 0
    for cut in sorted(splits) + [len(text)]:
        events += parser.feed(text[start:cut])
        start = cut
    events += parser.close()
    return events, parser.finish()


def check_stream_agrees(text, splits, tools=TOOLS, thinking=True):
    events, result = stream(text, splits, tools, thinking)
    whole = parse_output(text, tools, thinking=thinking)
    assert result == whole, f"split {sorted(splits)} of {text!r} parsed differently"
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert reasoning == (whole.reasoning or ""), "reasoning deltas do not join to the reasoning"
    assert content == whole.content, "content deltas do not join to the content"
    ends = [e.call for e in events if isinstance(e, ToolCallEnd)]
    assert ends == whole.tool_calls
    for tool_call in whole.tool_calls:
        own = [e for e in events if getattr(e, "index", None) == tool_call.index]
        assert isinstance(own[0], ToolCallStart) and own[0].name == tool_call.name, "the name must come first"
        assert isinstance(own[-1], ToolCallEnd)
        fragments = "".join(e.text for e in own if isinstance(e, ToolCallArgumentsDelta))
        assert json.loads(fragments) == tool_call.arguments, f"argument fragments {fragments!r} disagree"
    first_content = next((i for i, e in enumerate(events) if isinstance(e, ContentDelta)), len(events))
    last_reasoning = max((i for i, e in enumerate(events) if isinstance(e, ReasoningDelta)), default=-1)
    assert last_reasoning < first_content, "reasoning deltas must come before content deltas"


SAMPLE = ("Think about Oslo.\n</think>\n\nI'll check the weather." +
          call_text("get_weather", ("city", "Oslo <centre>"), ("days", "2"), ("opts", '{"x": [1, "y"]}')) +
          "\n" + call_text("open_tab", ("url", "https://example.org/?q=ü")))


def test_token_by_token_streaming_names_first_then_argument_fragments():
    events, result = stream(SAMPLE, range(1, len(SAMPLE)))
    kinds = [type(e).__name__ for e in events if getattr(e, "index", None) == 0]
    assert kinds[0] == "ToolCallStart" and kinds[-1] == "ToolCallEnd" and "ToolCallArgumentsDelta" in kinds
    # the string argument streams as it arrives: its characters come in several fragments
    fragments = [e.text for e in events if isinstance(e, ToolCallArgumentsDelta) and e.index == 0]
    assert len(fragments) > 10, fragments
    assert "".join(fragments) == result.tool_calls[0].arguments_json
    check_stream_agrees(SAMPLE, range(1, len(SAMPLE)))


def test_streaming_with_tokens_from_the_tokenizer():
    from glm5.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter([SAMPLE] * 20), vocab_size=400)
    offsets = tokenizer.backend.encode(SAMPLE, add_special_tokens=False).offsets
    check_stream_agrees(SAMPLE, [start for start, _ in offsets if start > 0])


PIECES = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
          "</arg_value>", "get_weather", "open_tab", "city", "days", "opts", "url", "3", "true", '{"a": 1}', "[1,",
          " ", "\n", "text", "ü日🙂", "<", "</", "<tool", "</arg_", ">", '"', "\\"]


@st.composite
def output_and_splits(draw):
    text = "".join(draw(st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=5)), max_size=30)))
    splits = draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=12)) if len(text) > 1 else set()
    return text, splits


@settings(deadline=None, max_examples=300)
@given(output_and_splits(), st.booleans(), st.booleans())
def test_streaming_result_equals_one_shot_for_every_split(case, thinking, with_tools):
    text, splits = case
    check_stream_agrees(text, splits, TOOLS if with_tools else None, thinking)


def test_feed_after_close_is_a_usage_error():
    parser = StreamingParser()
    parser.close()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    assert parser.close() == [], "close() twice yields nothing more"


# ---- fuzzing ----------------------------------------------------------------------------------------
def random_output(rng: random.Random) -> str:
    """Mostly well-formed GLM-5 output with random damage: dropped, repeated or swapped pieces, noise."""
    pieces = []
    if rng.random() < 0.7:
        pieces += [rng.choice(["", "<think>"]), rng.choice(["plan", "ü 🙂", "", " "]), rng.choice(["</think>", ""])]
    pieces.append(rng.choice(["Answer.", "", "\n\n", "x<y", "a</think>b"]))
    for _ in range(rng.randint(0, 3)):
        pieces += ["<tool_call>", rng.choice(["get_weather", "open_tab", "nope", "", " get_weather\n"])]
        for _ in range(rng.randint(0, 3)):
            pieces += ["<arg_key>", rng.choice(["city", "days", "opts", "url", "zz", ""]), "</arg_key>",
                       "<arg_value>", rng.choice(["Oslo", "3", "x3", '{"a": [1', "null", "[]", "", "</"]),
                       "</arg_value>"]
        pieces.append("</tool_call>")
    for _ in range(rng.randint(0, 4)):  # damage
        if not pieces:
            break
        i = rng.randrange(len(pieces))
        action = rng.random()
        if action < 0.4:
            del pieces[i]
        elif action < 0.7:
            pieces.insert(i, rng.choice(PIECES))
        else:
            j = rng.randrange(len(pieces))
            pieces[i], pieces[j] = pieces[j], pieces[i]
    return "".join(pieces)


@pytest.mark.slow
def test_fuzz_ten_thousand_outputs_never_raise_and_stream_consistently():
    rng = random.Random(1234)
    for n in range(10_000):
        text = random_output(rng)
        splits = {rng.randint(1, max(1, len(text) - 1)) for _ in range(rng.randint(0, 8))} if len(text) > 1 else set()
        try:
            tools = TOOLS if n % 3 else None
            assert stream(text, splits, tools, thinking=bool(n % 2))[1] == parse_output(text, tools, thinking=bool(n % 2))
        except Exception as err:
            raise AssertionError(f"input #{n} {text!r} split at {sorted(splits)}: {err!r}") from err


# ---- typed arguments, NaN, additionalProperties, format detection ----------------
_TYPED = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "coords": {"type": "array"}, "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "factor": {"type": "number"}}, "required": ["city"]}}}]


def _call(key, raw, tools=_TYPED):
    out = (f"</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value>"
           f"<arg_key>{key}</arg_key><arg_value>{raw}</arg_value></tool_call>")
    return parse_output(out, tools).tool_calls[0]


@pytest.mark.parametrize("key, raw, value, valid", [
    ("days", "3", 3, True),             # coerced, as vLLM's GLM parser does
    ("days", "3.5", 3.5, False), ("days", "true", True, False), ("days", "[3]", [3], False),
    ("days", '"3"', "3", False), ("metric", "1", 1, False), ("coords", '{"x": 1}', {"x": 1}, False),
    ("note", "42", "42", True), ("note", "true", "true", True), ("note", "null", None, True),  # string-or-null
    ("factor", "NaN", "NaN", False),    # not JSON: clients' parsers reject NaN / Infinity
])
def test_typed_arguments_are_checked_against_their_schema(key, raw, value, valid):
    call = _call(key, raw)
    assert call.arguments[key] == value and call.valid is valid, (call.arguments, call.error)
    json.loads(call.arguments_json)  # always strict JSON


def test_additional_properties_as_a_schema_allows_extra_keys():
    def tools(extra):
        return [{"type": "function", "function": {"name": "tag", "parameters": {
            "type": "object", "properties": {"id": {"type": "string"}}, **extra}}}]

    out = ("</think><tool_call>tag<arg_key>id</arg_key><arg_value>a</arg_value>"
           "<arg_key>color</arg_key><arg_value>red</arg_value></tool_call>")
    for extra, valid in (({"additionalProperties": True}, True), ({"additionalProperties": {}}, True),
                         ({"additionalProperties": {"type": "string"}}, True),
                         ({"additionalProperties": False}, False), ({}, False)):
        assert parse_output(out, tools(extra)).tool_calls[0].valid is valid, extra


def test_the_official_glm5_template_is_detected_as_glm5():
    from glm5.chat import GLM5_CHAT_TEMPLATE, detect_chat_format

    official_style = "{%- if x %}<|assistant|>\n{%- set reasoning_content = '' %}{%- endif %}"  # newline in source
    assert detect_chat_format(official_style) == "glm5"
    assert detect_chat_format(GLM5_CHAT_TEMPLATE) == "glm5"
    assert detect_chat_format("{{ '/nothink' }}<|assistant|>\n") == "glm45"


# ---- recovered slips: what GLM models are seen to write (vllm-project/vllm #47190, #49248) ----------
_ONE_PARAM = [{"type": "function", "function": {"name": "run_in_terminal", "parameters": {
    "type": "object", "properties": {"command": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "run", "parameters": {
        "type": "object", "properties": {"cmd": {"type": "string"}}}}}]


@pytest.mark.parametrize("text, name, arguments", [
    # the first <arg_key> left out: the name runs into the key; split at the longest known tool name
    ("</think><tool_call>get_weathercity</arg_key><arg_value>Oslo</arg_value></tool_call>",
     "get_weather", {"city": "Oslo"}),
    ("</think><tool_call>run_in_terminal command</arg_key><arg_value>ls -l</arg_value></tool_call>",
     "run_in_terminal", {"command": "ls -l"}),
    # 'run' is a prefix of 'run_in_terminal' too: the split whose rest is a parameter wins
    ("</think><tool_call>run_in_terminalcommand</arg_key><arg_value>ls</arg_value></tool_call>",
     "run_in_terminal", {"command": "ls"}),
    # the <arg_value> left out: the text after </arg_key> is the value
    ("</think><tool_call>get_weather<arg_key>city</arg_key>Oslo</arg_value><arg_key>days</arg_key>3</arg_value>"
     "</tool_call>", "get_weather", {"city": "Oslo", "days": 3}),
    # the <arg_key> left out where only one parameter is unset
    ("</think><tool_call>run_in_terminal<arg_value>pwd</arg_value></tool_call>", "run_in_terminal",
     {"command": "pwd"}),
])
def test_a_left_out_tag_is_recovered_when_the_intent_is_unambiguous(text, name, arguments):
    tools = TOOLS + _ONE_PARAM
    result = parse_output(text, tools)
    [call] = result.tool_calls
    assert (call.name, call.arguments, call.error) == (name, arguments, None)
    check_stream_agrees(text, range(1, len(text)), tools)
    check_stream_agrees(text, range(3, len(text), 7), tools)


def test_a_name_running_into_a_key_without_a_known_tool_stays_flagged():
    text = "</think><tool_call>get_weathercity</arg_key><arg_value>Oslo</arg_value></tool_call>"
    [call] = parse_output(text, None).tool_calls
    assert not call.valid and call.name == "get_weathercity"
