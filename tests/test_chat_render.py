"""Rendering GLM-5's chat format: exact strings, the Jinja template twin, the SFT mask.

    .venv/bin/python -m pytest -q tests/test_chat_render.py
"""

from __future__ import annotations

import json

import pytest

from glm5.chat import (
    GLM5_CHAT_TEMPLATE,
    TemplateError,
    detect_chat_format,
    parse_output,
    render_jinja_template,
    render_messages,
    render_messages_with_mask,
)
from glm5.chat.render import TOOLS_FOOTER, TOOLS_HEADER

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city — today or later",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "filters": {"type": "object"}, "top_k": {"type": "integer"}}}}}


def call(name, arguments, as_json=False):
    return {"id": f"call_{name}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments) if as_json else arguments}}


# ---- exact strings ----------------------------------------------------------------------------------
def test_single_user_turn_with_generation_prompt():
    assert render_messages([{"role": "user", "content": "hi"}]) == "[gMASK]<sop><|user|>hi<|assistant|><think>"


def test_thinking_disabled_prompt_ends_with_a_closed_think():
    text = render_messages([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert text.endswith("<|assistant|></think>"), text


def test_no_generation_prompt():
    text = render_messages([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                           add_generation_prompt=False)
    assert text == "[gMASK]<sop><|system|>S<|user|>U"


def test_tools_block_lists_each_tool_as_json_with_the_openai_envelope():
    text = render_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                           tools=[WEATHER, SEARCH])
    listing = json.dumps(WEATHER, ensure_ascii=False) + "\n" + json.dumps(SEARCH, ensure_ascii=False) + "\n"
    expected = ("[gMASK]<sop><|system|>" + TOOLS_HEADER + listing + TOOLS_FOOTER
                + "<|system|>Be brief.<|user|>hi<|assistant|><think>")
    assert text == expected
    assert "—" in text, "non-ASCII must be kept, not escaped"
    assert TOOLS_HEADER.startswith("\n# Tools\n\nYou may call one or more functions")
    assert TOOLS_FOOTER.endswith("<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>")


def test_reasoning_is_kept_only_after_the_last_user_message():
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "reasoning_content": " old thought ", "content": " a1 "},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "reasoning_content": "\nnew thought\n", "content": "",
         "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "reasoning": "it is sunny", "content": "Sunny."},
    ]
    expected = ("[gMASK]<sop><|user|>q1<|assistant|></think>a1<|user|>q2"
                "<|assistant|><think>new thought</think><tool_call>get_weather<arg_key>city</arg_key>"
                "<arg_value>Paris</arg_value></tool_call><|observation|><tool_response>sunny</tool_response>"
                "<|assistant|><think>it is sunny</think>Sunny.")
    assert render_messages(messages, add_generation_prompt=False) == expected
    kept = render_messages(messages, add_generation_prompt=False, clear_thinking=False)
    assert "<|assistant|><think>old thought</think>a1<|user|>" in kept, kept


def test_inline_think_in_content_is_split_like_reasoning():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nanswer"}]
    assert render_messages(messages, add_generation_prompt=False).endswith("<|assistant|><think>hmm</think>answer")


def test_tool_call_arguments_strings_raw_and_other_values_as_json():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "Looking.", "tool_calls": [
                    call("search", {"query": "naïve \"quotes\"", "filters": {"lang": "日本"}, "top_k": 3}, as_json=True),
                    call("get_weather", {"city": "Oslo", "days": 2})]}]
    text = render_messages(messages, add_generation_prompt=False)
    assert text.endswith(
        "<|assistant|></think>Looking.<tool_call>search<arg_key>query</arg_key><arg_value>naïve \"quotes\"</arg_value>"
        "<arg_key>filters</arg_key><arg_value>{\"lang\": \"日本\"}</arg_value><arg_key>top_k</arg_key>"
        "<arg_value>3</arg_value></tool_call><tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>"), text


def test_consecutive_tool_results_share_one_observation():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": [call("a", {}), call("b", {})]},
                {"role": "tool", "content": "r1"}, {"role": "tool", "content": [{"type": "text", "text": "r2"}]},
                {"role": "user", "content": "thanks"}, {"role": "tool", "content": "late"}]
    text = render_messages(messages, add_generation_prompt=False)
    assert text.endswith("<tool_call>a</tool_call><tool_call>b</tool_call><|observation|><tool_response>r1"
                         "</tool_response><tool_response>r2</tool_response><|user|>thanks<|observation|>"
                         "<tool_response>late</tool_response>"), text
    assert text.count("<|observation|>") == 2


@pytest.mark.parametrize("bad, match", [
    ([{"role": "wizard", "content": "x"}], "unknown role 'wizard'"),
    ([{"content": "x"}], "unknown role None"),
    (["just a string"], "must be an object"),
    ("hello", "must be a list"),
    ([{"role": "user", "content": 42}], "content must be"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}],
     "not valid JSON"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}], "needs a function name"),
])
def test_bad_messages_raise_a_clear_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        render_messages(bad)


# ---- the Jinja twin ---------------------------------------------------------------------------------
CONVERSATIONS = [
    ([{"role": "user", "content": "hi"}], None, {}),
    ([{"role": "user", "content": "hi"}], None, {"enable_thinking": False}),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}], None, {}),
    ([{"role": "developer", "content": "dev rules"}, {"role": "user", "content": "x"}], None, {}),
    ([{"role": "user", "content": ""}], None, {}),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": None}], None, {"add_generation_prompt": False}),
    ([{"role": "user", "content": "héllo 日本語 🙂 \"q\" <b>&amp;"}], [WEATHER], {}),
    ([{"role": "user", "content": [{"type": "text", "text": "part one "}, {"type": "image_url", "image_url": {}},
                                   {"type": "text", "text": "part two"}]}], None, {}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  padded answer \n"}], None,
     {"add_generation_prompt": False}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "think", "content": "a"},
      {"role": "user", "content": "q2"}], None, {}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "think", "content": "a"},
      {"role": "user", "content": "q2"}], None, {"clear_thinking": False}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "reasoning": "via reasoning key", "content": "a"}], None,
     {"add_generation_prompt": False}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>inline</think>\nrest"}], None,
     {"add_generation_prompt": False}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "   ", "content": "blank thought"}],
     None, {"add_generation_prompt": False}),
    ([{"role": "user", "content": "weather?"},
      {"role": "assistant", "reasoning_content": "use the tool", "content": "",
       "tool_calls": [call("get_weather", {"city": "Paris", "days": 3})]},
      {"role": "tool", "tool_call_id": "call_get_weather", "content": "{\"temp\": 21}"}], [WEATHER], {}),
    ([{"role": "user", "content": "two tools"},
      {"role": "assistant", "content": "Both.", "tool_calls": [call("get_weather", {"city": "Rome"}),
                                                               call("search", {"query": "rome", "top_k": 2})]},
      {"role": "tool", "content": "hot"}, {"role": "tool", "content": "many results"}, {"role": "tool", "content": ""},
      {"role": "assistant", "reasoning_content": "combine", "content": "Done."}], [WEATHER, SEARCH],
     {"add_generation_prompt": False}),
    ([{"role": "user", "content": "json args"},
      {"role": "assistant", "content": None,
       "tool_calls": [call("search", {"query": "x", "filters": {"a": [1, 2.5, None, True]}}, as_json=True)]}],
     [SEARCH], {}),
    ([{"role": "user", "content": "unicode args"},
      {"role": "assistant", "content": "",
       "tool_calls": [call("search", {"query": "Zürich ☃", "filters": {"städt": "Köln"}})]}], [SEARCH], {}),
    ([{"role": "user", "content": "q1"}, {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
      {"role": "user", "content": "q2"}, {"role": "assistant", "reasoning_content": "r2", "content": "a2"},
      {"role": "user", "content": "q3"}], None, {}),
    ([{"role": "user", "content": "q1"}, {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
      {"role": "user", "content": "q2"}, {"role": "assistant", "reasoning_content": "r2", "content": "a2"},
      {"role": "user", "content": "q3"}], None, {"clear_thinking": False, "enable_thinking": False}),
    ([{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
      {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "noargs", "arguments": ""}}]},
      {"role": "tool", "content": "ok"}], [{"name": "noargs", "parameters": {}}], {"enable_thinking": False}),
    ([{"role": "assistant", "content": "assistant speaks first"}, {"role": "user", "content": "then user"}], None, {}),
    ([{"role": "user", "content": "multi\nline\n\ncontent\twith tabs"}], [], {}),
    ([{"role": "user", "content": "bare tool call"},
      {"role": "assistant", "content": "x", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Lima"}}]}],
     [WEATHER], {"add_generation_prompt": False}),
]


def test_there_are_at_least_20_conversations():
    assert len(CONVERSATIONS) >= 20


@pytest.mark.parametrize("messages, tools, kwargs", CONVERSATIONS)
def test_jinja_template_renders_exactly_like_render_messages(messages, tools, kwargs):
    ours = render_messages(messages, tools, **kwargs)
    jinja = render_jinja_template(GLM5_CHAT_TEMPLATE, messages, tools, **kwargs)
    assert jinja == ours, f"first difference at char {next(i for i, (a, b) in enumerate(zip(jinja + '␀', ours + '␀')) if a != b)}"


@pytest.mark.parametrize("messages, tools, kwargs", CONVERSATIONS[:12])
def test_transformers_renders_our_template_the_same(messages, tools, kwargs):
    """transformers' own sandbox (what apply_chat_template uses) agrees, so a saved tokenizer_config works."""
    from transformers.utils.chat_template_utils import render_jinja_template as hf_render

    kwargs = dict(kwargs)
    add_generation_prompt = kwargs.pop("add_generation_prompt", True)
    rendered, _ = hf_render([messages], tools=tools, chat_template=GLM5_CHAT_TEMPLATE,
                            add_generation_prompt=add_generation_prompt, **kwargs)
    assert rendered[0] == render_messages(messages, tools, add_generation_prompt=add_generation_prompt, **kwargs)


def test_jinja_rejects_an_unknown_role_with_a_value_error():
    with pytest.raises(ValueError, match="unknown role"):
        render_jinja_template(GLM5_CHAT_TEMPLATE, [{"role": "wizard", "content": "x"}])
    with pytest.raises(TemplateError):
        render_jinja_template("{{ raise_exception('nope') }}", [])


def test_jinja_sandbox_blocks_attribute_escapes():
    with pytest.raises(ValueError):
        render_jinja_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])


def test_templates_with_generation_blocks_render():
    template = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    assert render_jinja_template(template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "ab"


def test_detect_chat_format():
    assert detect_chat_format(GLM5_CHAT_TEMPLATE) == "glm5"
    assert detect_chat_format("{{ '<|assistant|>\n' }}{{ '/nothink' }}") == "glm45"


# ---- SFT mask ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from glm5.tokenizer import train_tokenizer

    text = [json.dumps(c[0], ensure_ascii=False) for c in CONVERSATIONS] * 10
    return train_tokenizer(iter(text), vocab_size=600)


def masked_runs(tokenizer, ids, mask):
    runs, current = [], []
    for token, target in zip(ids + [None], mask + [False]):
        if target:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_mask_marks_exactly_the_assistant_turns_and_their_stop_tokens(tokenizer):
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "reasoning_content": "r-old", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "reasoning_content": "r2", "content": "calling",
         "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "warm"},
        {"role": "assistant", "reasoning_content": "r3", "content": "Sunny and warm."},
    ]
    ids, mask = render_messages_with_mask(messages, tokenizer, tools=[WEATHER])
    assert len(ids) == len(mask)
    assert masked_runs(tokenizer, ids, mask) == [
        "</think>a1<|user|>",
        "r2</think>calling<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
        "<|observation|>",
        "r3</think>Sunny and warm.<|endoftext|>",
    ]
    text = render_messages(messages, [WEATHER], add_generation_prompt=False)
    eos = tokenizer.special_token_id("<|endoftext|>")
    assert ids == tokenizer.encode(text, allow_special=True) + [eos], "pieces encoded apart differ from the whole"


@pytest.mark.parametrize("messages, tools, kwargs", CONVERSATIONS)
def test_mask_ids_equal_the_encoded_rendering(tokenizer, messages, tools, kwargs):
    ids, mask = render_messages_with_mask(messages, tokenizer, tools, eos_at_end=False, **kwargs)
    kwargs = {"add_generation_prompt": False, **kwargs}
    assert ids == tokenizer.encode(render_messages(messages, tools, **kwargs), allow_special=True)
    has_assistant = any(m.get("role") == "assistant" for m in messages)
    assert any(mask) == has_assistant, "targets appear exactly when there is an assistant turn"


# ---- round trip -------------------------------------------------------------------------------------
def test_render_of_parse_reproduces_a_rendered_assistant_turn():
    turn = ("brief plan</think>Let me check.<tool_call>search<arg_key>query</arg_key><arg_value>glm 5</arg_value>"
            "<arg_key>filters</arg_key><arg_value>{\"year\": 2026}</arg_value><arg_key>top_k</arg_key>"
            "<arg_value>5</arg_value></tool_call>")
    message = parse_output(turn, [SEARCH]).to_message()
    messages = [{"role": "user", "content": "q"}, message]
    assert render_messages(messages, [SEARCH], add_generation_prompt=False).endswith("<|assistant|><think>" + turn)
