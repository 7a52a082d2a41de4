"""Tool calls that break other GLM servers, through chat completions, Messages and Responses, streamed and not,
with MTP speculation off and on.

The real engine is made to write each output (serve_helpers.force_engine: a stateless logits processor forces
the ids, so with speculation the MTP drafts and the verification run through it and several tokens arrive per
step); the server detokenizes and parses them as any output. For every case and API the stream must be
well-formed, add up to the non-streamed reply, and that reply must be the expected message.
"""

from __future__ import annotations

import json

import pytest
from serve_helpers import running_server

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

MODEL = "nano"
LONG = "run_in_terminal_with_a_very_long_descriptive_name_for_testing"
SCHEMAS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "get_time": {"type": "object", "properties": {}},
    "configure": {"type": "object", "properties": {"options": {"type": "object"}, "note": {"type": "string"}}},
    "run_in_terminal": {"type": "object", "properties": {"command": {"type": "string"}}},
    LONG: {"type": "object", "properties": {"path": {"type": "string"}}},
}
CUT_VALUE = "San Francisco, California, United States of America"

# name -> (model output, expected (reasoning, content, [(tool, arguments)]))
CASES = {
    "call_before_think_is_closed": (
        "Let me look it up<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
        ("Let me look it up", "", [("get_weather", {"city": "Paris"})])),
    "zero_argument_call_inline": (
        "What time is it?</think><tool_call>get_time</tool_call>",
        ("What time is it?", "", [("get_time", {})])),
    "long_name_over_many_tokens": (
        f"</think><tool_call>{LONG}<arg_key>path</arg_key><arg_value>/tmp/x</arg_value></tool_call>",
        (None, "", [(LONG, {"path": "/tmp/x"})])),
    "json_text_values_not_double_encoded": (
        '</think><tool_call>configure<arg_key>options</arg_key><arg_value>{"depth": 2, "tags": ["a", "b"]}'
        '</arg_value><arg_key>note</arg_key><arg_value>{"raw": true}</arg_value></tool_call>',
        (None, "", [("configure", {"options": {"depth": 2, "tags": ["a", "b"]}, "note": '{"raw": true}'})])),
    "argument_without_arg_key": (
        "Run it.</think><tool_call>run_in_terminalcommand</arg_key><arg_value>ls -la</arg_value></tool_call>",
        ("Run it.", "", [("run_in_terminal", {"command": "ls -la"})])),
    "two_calls_in_a_row": (
        "</think>Checking both.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>",
        (None, "Checking both.", [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Rome"})])),
    "call_cut_off_by_max_tokens": (
        f"</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>{CUT_VALUE}</arg_value></tool_call>",
        None),  # checked separately: the value is a prefix of CUT_VALUE
}
FORCED: list[str] = []


@pytest.fixture(scope="module", params=[0, 2], ids=["mtp_off", "mtp_on"])
def server(request):
    argv = ["--preset", "nano", "--max-model-len", "1024", "--kv-cache-tokens", "8192",
            "--speculative-tokens", str(request.param)]
    with running_server(argv, forced=FORCED) as (base_url, app):
        yield base_url, app, request.param


def token_count(app, text: str) -> int:
    return len(app.state.tokenizer.encode(text, allow_special=True))


def max_tokens_for(app, case: str) -> int:
    text = CASES[case][0]
    if case == "call_cut_off_by_max_tokens":  # end inside the value: "San Francisco" written, the rest not
        return token_count(app, text[: text.index("San Francisco") + len("San Francisco")])
    return token_count(app, text) + 4


# ---- the three APIs, each: (streamed final message, plain final message) as (reasoning, content, calls, finish) --
def via_chat(base_url: str, text: str, max_tokens: int, stream: bool):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="k", max_retries=0, timeout=120)
    tools = [{"type": "function", "function": {"name": n, "parameters": s}} for n, s in SCHEMAS.items()]
    FORCED.append(text)
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "go"}], tools=tools, temperature=0,
                  max_tokens=max_tokens)
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        message = choice.message.model_dump()
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"] or []]
        return message.get("reasoning_content"), message["content"] or "", calls, choice.finish_reason
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta.model_dump()
        reasoning += delta.get("reasoning_content") or ""
        content += delta.get("content") or ""
        for call in delta.get("tool_calls") or []:
            if call["index"] not in calls:  # the first delta of a call carries its id and its whole name
                assert call["id"] and call["function"]["name"], call
                calls[call["index"]] = [call["function"]["name"], ""]
            else:
                assert call.get("id") is None and not call["function"].get("name"), "a name is sent once, whole"
            calls[call["index"]][1] += call["function"]["arguments"] or ""
        finish = chunk.choices[0].finish_reason or finish
    assert sorted(calls) == list(range(len(calls)))
    return reasoning or None, content, [(n, json.loads(a)) for n, a in calls.values()], finish


def blocks_to_message(blocks, stop_reason):
    reasoning = "".join(b["thinking"] for b in blocks if b["type"] == "thinking") or None
    content = "".join(b["text"] for b in blocks if b["type"] == "text")
    calls = [(b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"]
    return reasoning, content, calls, stop_reason


def via_messages(base_url: str, text: str, max_tokens: int, stream: bool):
    client = anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0, timeout=120)
    tools = [{"name": n, "input_schema": s} for n, s in SCHEMAS.items()]
    FORCED.append(text)
    kwargs = dict(model=MODEL, max_tokens=max_tokens, messages=[{"role": "user", "content": "go"}], tools=tools,
                  thinking={"type": "enabled", "budget_tokens": max_tokens - 1}, extra_body={"temperature": 0})
    if not stream:
        reply = client.messages.create(**kwargs)
        return blocks_to_message([b.model_dump() for b in reply.content], reply.stop_reason)
    kinds, partial = [], {}
    with client.messages.stream(**kwargs) as s:
        for event in s:
            if event.type in ("content_block_start", "content_block_delta", "content_block_stop"):
                kinds.append((event.type, event.index))
                if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                    partial[event.index] = partial.get(event.index, "") + event.delta.partial_json
        final = s.get_final_message()
    # well-formed: each block is start, its deltas, stop, in index order
    index = 0
    while kinds:
        assert kinds[0] == ("content_block_start", index), kinds
        end = kinds.index(("content_block_stop", index))
        assert all(k == ("content_block_delta", index) for k in kinds[1:end]), kinds
        kinds, index = kinds[end + 1:], index + 1
    blocks = [b.model_dump() for b in final.content]
    for i, block in enumerate(blocks):  # the input_json deltas of each tool_use join to its input
        if block["type"] == "tool_use":
            assert json.loads(partial[i]) == block["input"]
    return blocks_to_message(blocks, final.stop_reason)


def items_to_message(items, status):
    reasoning = "".join(p["text"] for i in items if i["type"] == "reasoning" for p in i["content"]) or None
    content = "".join(p["text"] for i in items if i["type"] == "message" for p in i["content"])
    calls = [(i["name"], json.loads(i["arguments"])) for i in items if i["type"] == "function_call"]
    return reasoning, content, calls, status


def via_responses(base_url: str, text: str, max_tokens: int, stream: bool):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="k", max_retries=0, timeout=120)
    tools = [{"type": "function", "name": n, "parameters": s} for n, s in SCHEMAS.items()]
    FORCED.append(text)
    kwargs = dict(model=MODEL, input="go", tools=tools, temperature=0, max_output_tokens=max_tokens)
    if not stream:
        reply = client.responses.create(**kwargs)
        return items_to_message([i.model_dump() for i in reply.output], reply.status)
    added, done, arguments, sequence, final = [], [], {}, [], None
    with client.responses.create(**kwargs, stream=True) as events:
        for event in events:
            sequence.append(event.sequence_number)
            if event.type == "response.output_item.added":
                added.append(event.output_index)
            elif event.type == "response.output_item.done":
                done.append(event.output_index)
            elif event.type == "response.function_call_arguments.delta":
                arguments[event.output_index] = arguments.get(event.output_index, "") + event.delta
            elif event.type == "response.function_call_arguments.done":
                assert json.loads(event.arguments) == json.loads(arguments[event.output_index])
            elif event.type in ("response.completed", "response.incomplete"):
                final = event.response
    assert sequence == list(range(len(sequence))) and added == done == list(range(len(added)))
    assert final is not None
    return items_to_message([i.model_dump() for i in final.output], final.status)


APIS = {"chat": (via_chat, "tool_calls", "length"), "messages": (via_messages, "tool_use", "max_tokens"),
        "responses": (via_responses, "completed", "incomplete")}


@pytest.mark.parametrize("api", list(APIS))
@pytest.mark.parametrize("case", list(CASES))
def test_tool_call_streams_well_formed_and_equal_to_the_plain_reply(server, case, api):
    base_url, app, speculative = server
    call, done_reason, cut_reason = APIS[api]
    text, expected = CASES[case]
    max_tokens = max_tokens_for(app, case)
    llm = app.state.engine.engine
    accepted_before = llm.stats.accepted
    streamed = call(base_url, text, max_tokens, stream=True)
    plain = call(base_url, text, max_tokens, stream=False)
    assert streamed == plain, f"{api} streamed {streamed} != plain {plain}"
    reasoning, content, calls, finish = plain
    if case == "call_cut_off_by_max_tokens":
        [(name, arguments)] = calls
        assert name == "get_weather" and CUT_VALUE.startswith(arguments["city"]) and arguments["city"]
        assert arguments["city"] != CUT_VALUE
        # cut inside the call: Messages and Responses say so; chat completions reports the call (OpenAI's rule)
        assert finish == (cut_reason if api != "chat" else done_reason), finish
    else:
        assert (reasoning, content, calls) == expected
        assert finish == done_reason
    if speculative:  # several tokens per step: the forced drafts were accepted
        assert llm.stats.accepted > accepted_before


def test_the_long_name_really_spans_many_tokens(server):
    assert token_count(server[1], LONG) >= 8
