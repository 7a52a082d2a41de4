"""OpenAI's Responses API through the official `openai` SDK: text and items, streaming events, a tool round trip,
previous_response_id with the bounded store, GET /v1/responses/{id}."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_helpers import running_server

from glm5.serve.responses_protocol import ResponseStore

openai = pytest.importorskip("openai")

MODEL = "nano"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
FORCED: list[str] = []
PROMPTS: list[list[int]] = []


@pytest.fixture(scope="module")
def server():
    argv = ["--preset", "nano", "--max-model-len", "512", "--kv-cache-tokens", "8192", "--default-max-tokens", "12",
            "--responses-store-items", "4"]
    with running_server(argv, forced=FORCED, prompts=PROMPTS) as (base_url, app):
        yield base_url, app


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def last_prompt(app) -> str:
    return app.state.tokenizer.decode(PROMPTS[-1])


def item_view(item) -> dict:
    """An output item without its random ids (and the SDK's own `parsed` field)."""
    view = {k: v for k, v in item.model_dump(exclude_none=True).items() if k not in ("id", "call_id")}
    if "content" in view:
        view["content"] = [{k: v for k, v in part.items() if k != "parsed"} for part in view["content"]]
    return view


def test_text_input_and_instructions(server, client):
    FORCED.append("Plan a greeting.</think>Hello there!")
    reply = client.responses.create(model=MODEL, input="Say hi", instructions="Be kind.", temperature=0,
                                    max_output_tokens=40)
    assert reply.status == "completed" and reply.id.startswith("resp_")
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    assert reply.output[0].content[0].text == "Plan a greeting."
    assert reply.output_text == "Hello there!"
    assert reply.usage.input_tokens == len(PROMPTS[-1]) and reply.usage.output_tokens > 0
    assert last_prompt(server[1]).startswith("[gMASK]<sop><|system|>Be kind.<|user|>Say hi<|assistant|><think>")


def test_streamed_events_and_the_same_final_response(client):
    FORCED.append("Think.</think>Streaming works.")
    kinds, text = [], ""
    with client.responses.stream(model=MODEL, input="go", temperature=0, max_output_tokens=40) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
                 "response.output_text.done", "response.content_part.done", "response.output_item.done",
                 "response.reasoning_text.delta"):
        assert kind in kinds, kind
    assert text == "Streaming works." == final.output_text
    FORCED.append("Think.</think>Streaming works.")
    plain = client.responses.create(model=MODEL, input="go", temperature=0, max_output_tokens=40)
    assert [item_view(i) for i in plain.output] == [item_view(i) for i in final.output]


def test_tool_round_trip_with_items_streamed_and_not(server, client):
    for stream in (False, True):
        FORCED.append("Need data.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
                      "</tool_call>")
        items = [{"role": "user", "content": "Weather in Paris?"}]
        if stream:
            with client.responses.stream(model=MODEL, input=items, tools=TOOLS, temperature=0,
                                         max_output_tokens=60) as s:
                deltas = "".join(e.delta for e in s if e.type == "response.function_call_arguments.delta")
                first = s.get_final_response()
            assert json.loads(deltas) == {"city": "Paris"}
        else:
            first = client.responses.create(model=MODEL, input=items, tools=TOOLS, temperature=0,
                                            max_output_tokens=60)
        call = first.output[-1]
        assert call.type == "function_call" and call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_")
        FORCED.append("Got it.</think>Sunny in Paris.")
        items += [item.model_dump(exclude_none=True) for item in first.output]
        items.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"})
        second = client.responses.create(model=MODEL, input=items, tools=TOOLS, temperature=0, max_output_tokens=60)
        assert second.output_text == "Sunny in Paris."
        prompt = last_prompt(server[1])
        assert ("<|assistant|><think>Need data.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris"
                "</arg_value></tool_call><|observation|><tool_response>sunny, 21C</tool_response><|assistant|><think>"
                ) in prompt


def test_previous_response_id_continues_the_conversation_and_get_returns_it(server, client):
    FORCED.append("A.</think>First answer.")
    first = client.responses.create(model=MODEL, input="first question", instructions="Old rules.", temperature=0,
                                    max_output_tokens=30)
    FORCED.append("B.</think>Second answer.")
    second = client.responses.create(model=MODEL, input="second question", previous_response_id=first.id,
                                     instructions="New rules.", temperature=0, max_output_tokens=30)
    prompt = last_prompt(server[1])
    # earlier turns and their answers come back; instructions are the new request's only; the old turn's
    # reasoning is dropped (it precedes the last user message)
    assert prompt.startswith("[gMASK]<sop><|system|>New rules.<|user|>first question<|assistant|></think>"
                             "First answer.<|user|>second question<|assistant|><think>"), prompt
    assert "Old rules." not in prompt
    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == "Second answer." and got.previous_response_id == first.id
    unstored = client.responses.create(model=MODEL, input="x", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_missing")


def test_the_server_store_is_bounded(server, client):
    ids = [client.responses.create(model=MODEL, input=f"q{i}", max_output_tokens=2).id for i in range(6)]
    store = server[1].state.responses_store
    assert len(store) == 4  # --responses-store-items 4: the two oldest were evicted
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])
    assert client.responses.retrieve(ids[-1]).id == ids[-1]


def test_store_evicts_least_recently_used_by_count_and_bytes():
    store = ResponseStore(max_items=3, max_bytes=10_000)
    for i in range(3):
        store.put({"id": f"r{i}", "output": []}, [])
    store.get("r0")  # r0 is now the most recently used
    store.put({"id": "r3", "output": []}, [])
    assert list(store.entries) == ["r2", "r0", "r3"]
    assert "r1" not in store.entries and "r0" in store.entries and len(store) == 3
    big = {"id": "big", "output": [{"text": "x" * 6000}]}
    store.put(big, [])
    assert "big" in store.entries and store.bytes <= 10_000
    assert len(store) < 4
    store.put({"id": "huge", "output": [{"text": "x" * 20_000}]}, [])  # larger than the store: not kept
    assert "huge" not in store.entries and store.bytes == sum(size for _, _, size in store.entries.values())


def test_max_output_tokens_gives_an_incomplete_response(client):
    reply = client.responses.create(model=MODEL, input="hello", max_output_tokens=3)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 3


def test_bad_requests_get_openai_errors(server):
    with httpx.Client(base_url=server[0], timeout=60) as http:
        for body in ({}, {"model": MODEL}, {"model": MODEL, "input": []}, {"model": MODEL, "input": 5},
                     {"model": MODEL, "input": "x", "tools": [{"type": "function", "name": "bad name"}]},
                     {"model": MODEL, "input": [{"type": "function_call", "call_id": "c", "name": "f",
                                                 "arguments": "not json"}]},
                     {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
                     {"model": MODEL, "input": "x", "tool_choice": "required"},
                     {"model": MODEL, "input": "x", "max_output_tokens": 0}):
            r = http.post("/v1/responses", json=body)
            assert r.status_code == 400, (body, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert http.post("/v1/responses", json={"model": "other", "input": "x"}).status_code == 404
        # built-in tools a client sends with every request are ignored, not refused
        ok = http.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 2,
                                              "tools": [{"type": "web_search"}, {"type": "local_shell"}, TOOLS[0]]})
        assert ok.status_code == 200 and [t["name"] for t in ok.json()["tools"]] == ["get_weather"]
        assert http.get("/v1/responses/resp_nope").status_code == 404
        assert http.get("/health").json()["status"] == "ok"


def test_an_engine_failure_is_a_500_or_a_failed_event(server, client):
    llm = server[1].state.engine.engine
    step = llm.step

    def broken():
        raise RuntimeError("boom")

    llm.step = broken
    try:
        with pytest.raises(openai.InternalServerError):
            client.responses.create(model=MODEL, input="x", max_output_tokens=4)
        with client.responses.create(model=MODEL, input="x", max_output_tokens=4, stream=True) as events:
            kinds = [e.type for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.failed"
    finally:
        llm.step = step
    assert client.responses.create(model=MODEL, input="x", max_output_tokens=2).status == "incomplete"
