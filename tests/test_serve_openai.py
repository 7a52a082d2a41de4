"""The server through the official `openai` SDK: streaming, tools, reasoning, concurrency, parameters."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from serve_helpers import running_server

openai = pytest.importorskip("openai")

MODEL = "nano"
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture(scope="module")
def server():
    argv = ["--preset", "nano", "--max-model-len", "512", "--kv-cache-tokens", "8192", "--default-max-tokens", "12"]
    with running_server(argv) as (base_url, app):
        yield base_url, app


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def user(text="Hello, who are you?"):
    return [{"role": "user", "content": text}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok"


def test_streamed_chat_is_a_complete_well_formed_stream_with_the_same_text_as_unstreamed(client):
    no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}
    stream = client.chat.completions.create(
        model=MODEL, messages=user(), stream=True, max_tokens=10, temperature=0,
        stream_options={"include_usage": True}, extra_body=no_thinking)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("length", "stop"), finishes
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 10
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len({c.id for c in chunks}) == 1
    plain = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=10, temperature=0,
                                           extra_body=no_thinking)
    assert text == plain.choices[0].message.content, "greedy: the stream must spell the unstreamed answer"
    assert len(text) > 0 and finishes[0] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_reasoning_is_returned_as_reasoning_content_and_reasoning(client):
    reply = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=8, temperature=0)
    message = reply.choices[0].message.model_dump()
    # a random model never closes </think>: everything it writes after the <think> prompt is reasoning
    assert message["reasoning_content"] and message["reasoning_content"] == message["reasoning"]
    off = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=8, temperature=0,
                                         extra_body={"thinking": {"type": "disabled"}})
    off_message = off.choices[0].message.model_dump()
    assert off_message.get("reasoning_content") is None and off_message["content"]
    stream = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.model_dump().get("reasoning_content") or "" for c in stream if c.choices)
    assert streamed == message["reasoning_content"]


def test_tool_call_round_trip(client):
    messages = user("What is the weather in Paris?")
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, max_tokens=8,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="auto",
                                            max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens, "the call and its result are in the prompt"


def test_streamed_tool_call_and_required_choice(client):
    stream = client.chat.completions.create(model=MODEL, messages=user("time?"), tools=TOOLS, max_tokens=6,
                                            tool_choice={"type": "function", "function": {"name": "get_time"}},
                                            stream=True)
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_time" and calls[0].id
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    required = client.chat.completions.create(model=MODEL, messages=user(), tools=TOOLS[:1], tool_choice="required",
                                              max_tokens=6)
    assert required.choices[0].message.tool_calls[0].function.name == "get_weather"
    for seed in range(3):  # several tools: the model picks one, held to the tool names
        picked = client.chat.completions.create(model=MODEL, messages=user(), tools=TOOLS, tool_choice="required",
                                                max_tokens=8, seed=seed, temperature=1.0)
        assert picked.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")


def test_sampling_parameters_seed_n_stop_logprobs(client):
    kwargs = dict(model=MODEL, messages=user(), max_completion_tokens=12, temperature=1.0, seed=7,
                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content, "same seed, same text"
    many = client.chat.completions.create(**kwargs, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == a.choices[0].message.content
    text = a.choices[0].message.content
    assert len(text) > 4, text  # 12 tokens of a random model (thinking off): content to cut
    stop = text[2:4]
    stopped = client.chat.completions.create(**kwargs, stop=[stop])
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    lp = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=4, logprobs=True, top_logprobs=2)
    entries = lp.choices[0].logprobs.content
    assert len(entries) == 4 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


@pytest.mark.parametrize("max_tokens", [3, 9, 40])
def test_json_object_mode_answers_a_complete_object_within_max_tokens(client, max_tokens):
    """A random model would write anything: constrained decoding makes every answer a JSON object, closed
    before max_tokens runs out (so finish_reason is "stop"), streamed or not, at any seed."""
    for seed in range(3):
        kwargs = dict(model=MODEL, messages=user("Reply in JSON"), max_tokens=max_tokens, temperature=1.0, seed=seed,
                      response_format={"type": "json_object"})
        reply = client.chat.completions.create(**kwargs)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        assert reply.usage.completion_tokens <= max_tokens
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True)
                           if c.choices)
        assert streamed == choice.message.content, "same seed: the stream spells the same object"


def test_text_completions(client):
    out = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=6, temperature=0, logprobs=1)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 6
    assert len(out.choices[0].logprobs.tokens) == out.usage.completion_tokens
    streamed = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], max_tokens=3, n=2)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]


def test_32_concurrent_streaming_clients_each_get_a_complete_stream(server):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL, messages=user(f"client {i}"), stream=True, max_tokens=6 + i % 5, temperature=0,
            stream_options={"include_usage": True}, extra_body={"thinking": {"type": "disabled"}})
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finished) == 1 and finished[0].choices[0].finish_reason in ("length", "stop")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6 + i % 5
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    async def main():
        async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    texts = asyncio.run(main())
    for i in (0, 13, 31):  # batched with 31 others, streamed: the same greedy text as alone and unstreamed
        alone = openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model=MODEL, messages=user(f"client {i}"), max_tokens=6 + i % 5, temperature=0,
            extra_body={"thinking": {"type": "disabled"}})
        assert texts[i] == alone.choices[0].message.content, i
    engine = server[1].state.engine.engine
    assert engine.num_running == 0 and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    engine = server[1].state.engine.engine
    body = {"model": MODEL, "messages": user(), "stream": True, "max_tokens": 400}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server[0] + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            assert engine.num_running + engine.num_waiting >= 1
    for _ in range(200):
        if engine.num_running == 0 and engine.num_waiting == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert engine.num_running == 0 and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_metrics_are_exposed(server, client):
    client.chat.completions.create(model=MODEL, messages=user(), max_tokens=2)
    text = httpx.get(server[0] + "/metrics").text
    assert 'glm5_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "glm5_time_to_first_token_seconds_bucket" in text and "glm5_generation_tokens_total" in text
