"""Anthropic's Messages API through the official `anthropic` SDK: plain, streamed, tools, thinking, errors."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from serve_helpers import running_server

anthropic = pytest.importorskip("anthropic")

MODEL = "nano"
TOOLS = [{"name": "get_weather", "description": "Weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
FORCED: list[str] = []  # texts the engine is made to write, first in first out (see serve_helpers.force_engine)
PROMPTS: list[list[int]] = []


@pytest.fixture(scope="module")
def server():
    argv = ["--preset", "nano", "--max-model-len", "512", "--kv-cache-tokens", "8192", "--default-max-tokens", "12"]
    with running_server(argv, forced=FORCED, prompts=PROMPTS) as (base_url, app):
        yield base_url, app


@pytest.fixture()
def client(server):
    return anthropic.Anthropic(base_url=server[0], api_key="any-key", max_retries=0, timeout=120)


def last_prompt(app) -> str:
    return app.state.tokenizer.decode(PROMPTS[-1])


USER = [{"role": "user", "content": "Hello, who are you?"}]
GREEDY = {"temperature": 0}  # the SDK has no sampling arguments any more; the API still takes them


def test_plain_message(client):
    reply = client.messages.create(model=MODEL, max_tokens=8, messages=USER, extra_body=GREEDY)
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in reply.content] == ["text"]  # thinking is off unless asked for, as Anthropic's default
    assert 1 <= reply.usage.output_tokens <= 8 and reply.usage.input_tokens > 0


def test_streamed_events_follow_anthropics_sequence_and_add_up_to_the_plain_reply(client):
    with client.messages.stream(model=MODEL, max_tokens=10, messages=USER, extra_body=GREEDY,
                                thinking={"type": "enabled", "budget_tokens": 4}) as stream:
        events = [e.type for e in stream if e.type in (
            "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
            "message_stop")]
        streamed = stream.get_final_message()
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    body = events[1:-2]
    # every block is start, deltas, stop
    while body:
        assert body[0] == "content_block_start", events
        end = body.index("content_block_stop")
        assert set(body[1:end]) <= {"content_block_delta"}
        body = body[end + 1:]
    plain = client.messages.create(model=MODEL, max_tokens=10, messages=USER, extra_body=GREEDY,
                                   thinking={"type": "enabled", "budget_tokens": 4})
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in plain.content]
    assert (streamed.stop_reason, streamed.usage.output_tokens) == (plain.stop_reason, plain.usage.output_tokens)
    total = [m.usage.input_tokens + m.usage.cache_read_input_tokens for m in (streamed, plain)]
    assert total[0] == total[1] == len(PROMPTS[-1]), total


def test_raw_stream_has_ping_and_thinking_signature(server):
    FORCED.append("Hmm, a greeting.</think>Hi.")
    body = {"model": MODEL, "max_tokens": 30, "messages": USER, "stream": True, "temperature": 0,
            "thinking": {"type": "enabled", "budget_tokens": 20}}
    with httpx.stream("POST", server[0] + "/v1/messages", json=body,
                      headers={"x-api-key": "k", "anthropic-version": "2023-06-01"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in datas]
    assert names[:2] == ["message_start", "ping"]
    deltas = [d["delta"]["type"] for d in datas if d["type"] == "content_block_delta"]
    assert "thinking_delta" in deltas and "signature_delta" in deltas
    starts = [d["content_block"]["type"] for d in datas if d["type"] == "content_block_start"]
    assert starts == ["thinking", "text"]
    thinking = "".join(d["delta"].get("thinking", "") for d in datas if d["type"] == "content_block_delta")
    signature = next(d["delta"]["signature"] for d in datas
                     if d["type"] == "content_block_delta" and d["delta"]["type"] == "signature_delta")
    assert thinking == "Hmm, a greeting." and len(signature) == 64
    final = next(d for d in datas if d["type"] == "message_delta")
    assert final["delta"]["stop_reason"] == "end_turn" and final["usage"]["output_tokens"] > 0


def test_thinking_budget_closes_the_reasoning(client):
    unbounded = client.messages.create(model=MODEL, max_tokens=12, messages=USER, extra_body=GREEDY,
                                       thinking={"type": "enabled", "budget_tokens": 11})
    bounded = client.messages.create(model=MODEL, max_tokens=12, messages=USER, extra_body=GREEDY,
                                     thinking={"type": "enabled", "budget_tokens": 2})
    # a random model never writes </think> by itself; the budget makes the third token </think>
    assert [b.type for b in unbounded.content] == ["thinking"]
    assert bounded.content[0].type == "thinking" and len(bounded.content[0].thinking) < len(
        unbounded.content[0].thinking)


def test_tool_round_trip_keeps_the_thinking_of_the_tool_loop(server, client):
    app = server[1]
    FORCED.append("I need the weather.</think>Let me check.<tool_call>get_weather<arg_key>city</arg_key>"
                  "<arg_value>Paris</arg_value></tool_call>")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.messages.create(model=MODEL, max_tokens=60, messages=messages, tools=TOOLS, extra_body=GREEDY,
                                   thinking={"type": "enabled", "budget_tokens": 50})
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["thinking", "text", "tool_use"]
    thinking, text, call = first.content
    assert thinking.thinking == "I need the weather." and text.text == "Let me check."
    assert call.name == "get_weather" and call.input == {"city": "Paris"} and call.id.startswith("toolu_")
    FORCED.append("It says sunny.</think>It is sunny in Paris.")
    messages += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]
    second = client.messages.create(model=MODEL, max_tokens=60, messages=messages, tools=TOOLS, extra_body=GREEDY,
                                    thinking={"type": "enabled", "budget_tokens": 50})
    assert second.stop_reason == "end_turn"
    assert [(b.type, getattr(b, "text", None)) for b in second.content][1] == ("text", "It is sunny in Paris.")
    prompt = last_prompt(app)
    # a tool result is not a new user turn: the tool loop's reasoning is rendered (interleaved thinking)
    assert ("<|assistant|><think>I need the weather.</think>Let me check.<tool_call>get_weather<arg_key>city"
            "</arg_key><arg_value>Paris</arg_value></tool_call><|observation|><tool_response>sunny</tool_response>"
            "<|assistant|><think>") in prompt


def test_thinking_of_turns_before_the_last_user_message_is_dropped(server, client):
    FORCED.append("Fine.</think>Done.")
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "OLD THOUGHT", "signature": "x"},
                                          {"type": "text", "text": "first answer"}]},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "NEW THOUGHT", "signature": "y"},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "rain"}]}]},
    ]
    reply = client.messages.create(model=MODEL, max_tokens=20, messages=messages, tools=TOOLS, extra_body=GREEDY,
                                   system=[{"type": "text", "text": "Be brief."}],
                                   thinking={"type": "enabled", "budget_tokens": 10})
    assert reply.content[-1].text == "Done."
    prompt = last_prompt(server[1])
    assert "OLD THOUGHT" not in prompt and "<|assistant|></think>first answer" in prompt
    assert "<think>NEW THOUGHT</think><tool_call>get_weather" in prompt
    assert "<|system|>Be brief.<|user|>first question" in prompt


def test_stop_sequences_and_count_tokens(server, client):
    FORCED.append("</think>one two three STOP four")
    reply = client.messages.create(model=MODEL, max_tokens=30, messages=USER, extra_body=GREEDY,
                                   stop_sequences=["STOP"], thinking={"type": "enabled", "budget_tokens": 20})
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "STOP"
    assert reply.content[-1].text == "one two three"
    counted = client.messages.count_tokens(model=MODEL, messages=USER, thinking={"type": "enabled",
                                                                                  "budget_tokens": 20})
    assert counted.input_tokens == reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens == len(PROMPTS[-1])


def test_tool_choice_any_forces_a_call_and_none_hides_the_tools(server, client):
    reply = client.messages.create(model=MODEL, max_tokens=12, messages=USER, tools=TOOLS, extra_body=GREEDY,
                                   tool_choice={"type": "any"})
    # (a random model rarely closes the call within 12 tokens: a call cut off ends with max_tokens)
    assert reply.stop_reason in ("tool_use", "max_tokens") and reply.content[-1].type == "tool_use"
    assert reply.content[-1].name == "get_weather"
    client.messages.create(model=MODEL, max_tokens=4, messages=USER, tools=TOOLS, tool_choice={"type": "none"})
    assert "# Tools" not in last_prompt(server[1])


def test_ten_concurrent_streams(server):
    async def one(client, i):
        async with client.messages.stream(model=MODEL, max_tokens=6 + i % 3, extra_body=GREEDY,
                                          messages=[{"role": "user", "content": f"question {i}"}]) as stream:
            kinds = [e.type async for e in stream]
            return kinds, await stream.get_final_message()

    async def main():
        client = anthropic.AsyncAnthropic(base_url=server[0], api_key="k", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, i) for i in range(10)))

    results = asyncio.run(main())
    for i, (kinds, message) in enumerate(results):
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
        assert message.stop_reason in ("end_turn", "max_tokens")
        assert message.usage.output_tokens <= 6 + i % 3


def malformed_bodies(rng: random.Random) -> list:
    good = {"model": MODEL, "max_tokens": 4, "messages": USER}
    fixed = [
        {}, [], "text", 42, None, {"model": MODEL}, {"model": MODEL, "max_tokens": 4},
        {**good, "max_tokens": 0}, {**good, "max_tokens": "4"}, {**good, "model": "claude-unknown"},
        {**good, "messages": []}, {**good, "messages": [{"role": "system", "content": "x"}]},
        {**good, "messages": [{"role": "assistant", "content": "x"}]},
        {**good, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {**good, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]},
        {**good, "messages": [{"role": "user", "content": [{"type": "nope"}]}]},
        {**good, "messages": [{"role": "user", "content": 5}]},
        {**good, "temperature": 1.5}, {**good, "top_p": 0}, {**good, "top_k": -1},
        {**good, "thinking": {"type": "enabled"}}, {**good, "thinking": {"type": "enabled", "budget_tokens": 9}},
        {**good, "thinking": {"type": "maybe"}}, {**good, "stop_sequences": [""]}, {**good, "stop_sequences": "x"},
        {**good, "tools": [{"name": "bad name!", "input_schema": {"type": "object"}}]},
        {**good, "tools": [{"name": "f", "input_schema": {"type": "array"}}]},
        {**good, "tools": [{"name": "f"}]}, {**good, "tools": [{"type": "web_search_20250305", "name": "web_search",
                                                               "input_schema": {"type": "object"}}]},
        {**good, "tool_choice": {"type": "tool"}}, {**good, "tool_choice": {"type": "any"}},
        {**good, "tool_choice": {"type": "tool", "name": "missing"}, "tools": TOOLS},
        {**good, "system": 7}, {**good, "metadata": "x"}, {**good, "max_tokens": 10**9},
        {**good, "messages": [{"role": "user", "content": "x" * 5000}]},
    ]
    bodies: list = [json.dumps(b) for b in fixed]
    bodies += ["{", "not json", '{"model": ', "\xff\xfe", "[" * 5000 + "]" * 5000]
    keys = ["model", "max_tokens", "messages", "system", "tools", "tool_choice", "thinking", "temperature", "stream"]
    junk = [None, -1, 1e30, "", "x", [], {}, [1], {"a": 1}, True]
    while len(bodies) < 200:
        body = dict(good)
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(keys)] = rng.choice(junk)
        if rng.random() < 0.3:
            body.pop(rng.choice(["model", "max_tokens", "messages"]), None)
        bodies.append(json.dumps(body))
    return bodies


def test_two_hundred_malformed_requests_get_anthropic_4xx_errors_and_the_server_stays_healthy(server, client):
    rng = random.Random(0)
    bodies = malformed_bodies(rng)
    statuses = {}
    with httpx.Client(base_url=server[0], timeout=60) as http:
        for raw in bodies:
            r = http.post("/v1/messages", content=raw, headers={"content-type": "application/json",
                                                                 "x-api-key": "k", "anthropic-version": "2023-06-01"})
            if r.status_code == 200:  # random junk that happens to be valid (e.g. stream: false)
                assert json.loads(raw).get("messages") == USER
                continue
            assert 400 <= r.status_code < 500, (raw[:200], r.status_code, r.text)
            body = r.json()
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
            assert body["error"]["type"] in ("invalid_request_error", "not_found_error", "request_too_large")
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert sum(statuses.values()) >= 180, statuses
        assert http.get("/health").json()["status"] == "ok"
        big = http.post("/v1/messages", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-3-opus", max_tokens=4, messages=USER)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=4, messages=[])
    assert client.messages.create(model=MODEL, max_tokens=4, messages=USER).usage.output_tokens >= 1


def test_parallel_tool_use_off_keeps_the_first_call_and_a_named_tool_is_forced(server, client):
    FORCED.append("</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>"
                  "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>")
    one = client.messages.create(model=MODEL, max_tokens=60, messages=USER, tools=TOOLS, extra_body=GREEDY,
                                 tool_choice={"type": "auto", "disable_parallel_tool_use": True},
                                 thinking={"type": "enabled", "budget_tokens": 50})
    assert [(b.type, getattr(b, "input", None)) for b in one.content] == [("tool_use", {"city": "Oslo"})]
    named = client.messages.create(model=MODEL, max_tokens=10, messages=USER, tools=TOOLS, extra_body=GREEDY,
                                   tool_choice={"type": "tool", "name": "get_weather"})
    assert named.content[-1].type == "tool_use" and named.content[-1].name == "get_weather"
    assert last_prompt(server[1]).endswith("<|assistant|></think><tool_call>get_weather<arg_key>")


def test_an_engine_failure_is_an_api_error_body_or_an_error_event(server, client):
    llm = server[1].state.engine.engine
    step = llm.step

    def broken():
        raise RuntimeError("boom")

    llm.step = broken
    try:
        with pytest.raises(anthropic.InternalServerError) as failure:
            client.messages.create(model=MODEL, max_tokens=4, messages=USER)
        assert failure.value.status_code == 500 and failure.value.body["error"]["type"] == "api_error"
        body = {"model": MODEL, "max_tokens": 4, "messages": USER, "stream": True}
        with httpx.stream("POST", server[0] + "/v1/messages", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        last = json.loads(lines[-1].removeprefix("data: "))
        assert last == {"type": "error", "error": {"type": "api_error", "message": "engine error: RuntimeError"}}
    finally:
        llm.step = step
    assert client.messages.create(model=MODEL, max_tokens=3, messages=USER).usage.output_tokens >= 1


def test_a_final_assistant_message_is_a_prefill_the_model_continues(server, client):
    FORCED.append(" forty-two.")
    messages = [{"role": "user", "content": "What is six times seven?"},
                {"role": "assistant", "content": "The answer is"}]
    reply = client.messages.create(model=MODEL, max_tokens=20, messages=messages, extra_body=GREEDY)
    assert last_prompt(server[1]).endswith("<|user|>What is six times seven?<|assistant|></think>The answer is")
    assert [b.text for b in reply.content] == [" forty-two."]  # only the continuation comes back, as written
    FORCED.append(" forty-two.")
    with client.messages.stream(model=MODEL, max_tokens=20, messages=messages, extra_body=GREEDY) as stream:
        assert "".join(stream.text_stream) == " forty-two."
    counted = client.messages.count_tokens(model=MODEL, messages=messages)
    assert counted.input_tokens == len(PROMPTS[-1])
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=20, messages=messages,
                               thinking={"type": "enabled", "budget_tokens": 10})
    with pytest.raises(anthropic.BadRequestError, match="trailing whitespace"):
        client.messages.create(model=MODEL, max_tokens=20, messages=[messages[0], {"role": "assistant",
                                                                                   "content": "The answer is "}])
