"""OpenAI API details that were once wrong (each test failed before its fix).

A real `glm5 serve --preset nano` on loopback; where the output must be known, the engine is scripted
(`serve_helpers.script_engine`: the texts it 'generates'; everything around it is the real server).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch
from serve_helpers import running_server

ARGV = ["--preset", "nano", "--max-model-len", "1024", "--kv-cache-tokens", "8192", "--default-max-tokens", "8",
        "--threads", "1"]
HI = [{"role": "user", "content": "hi"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server():
    script: list[str] = []
    prompts: list[list[int]] = []
    with running_server(ARGV, script=script, prompts=prompts) as (base, app):
        with httpx.Client(base_url=base, timeout=120) as http:
            yield http, app, script, prompts


def chat(http, **body):
    return http.post("/v1/chat/completions", json={"model": "nano", "messages": HI, **body})


def test_null_means_the_default_for_optional_fields(server):
    http, *_ = server
    for field in ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "logprobs", "stream", "seed"):
        r = chat(http, max_tokens=2, **{field: None})
        assert r.status_code == 200, (field, r.text)
    for field in ("temperature", "echo", "n"):
        r = http.post("/v1/completions", json={"model": "nano", "prompt": "hi", "max_tokens": 2, field: None})
        assert r.status_code == 200, (field, r.text)
    r = http.post("/v1/chat/completions", json={"model": None, "messages": HI})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_tool_call_text_is_kept_when_tools_are_off(server):
    http, _, script, _ = server
    text = "Use <tool_call>get_time</tool_call> to see the time."
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
    for extra in ({}, {"tools": tools, "tool_choice": "none"}):
        script[:] = [text, text]
        message = chat(http, **NO_THINK, **extra).json()["choices"][0]["message"]
        assert message["content"] == text and not message.get("tool_calls"), (extra, message)
        streamed = ""
        with http.stream("POST", "/v1/chat/completions",
                         json={"model": "nano", "messages": HI, "stream": True, **NO_THINK, **extra}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        streamed += choice["delta"].get("content") or ""
        assert streamed == text, (extra, streamed)
    # with tools on, the same text is a call
    script[:] = [text]
    message = chat(http, **NO_THINK, tools=tools).json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "get_time"


def test_json_mode_closes_the_think_block_before_the_json(server):
    http, app, script, prompts = server
    script[:] = ['{"a": 1}']
    message = chat(http, response_format={"type": "json_object"}).json()["choices"][0]["message"]
    assert json.loads(message["content"]) == {"a": 1}
    assert app.state.tokenizer.decode(prompts[-1]).endswith("<|assistant|></think>")


def test_logprob_bytes_rebuild_characters_split_over_tokens(server):
    http, app, script, _ = server
    script[:] = ["日本"]
    assert len(app.state.tokenizer.encode("日本")) > 2  # byte-level pieces, not whole characters
    entries = chat(http, logprobs=True, top_logprobs=1, **NO_THINK).json()["choices"][0]["logprobs"]["content"]
    assert bytes(b for e in entries for b in e["bytes"]).decode() == "日本"
    assert all(e["top_logprobs"][0]["bytes"] == e["bytes"] for e in entries)


def test_logit_bias_is_applied_and_checked(server):
    http, app, _, _ = server
    token = app.state.tokenizer.encode(" b")[0]
    r = chat(http, max_tokens=4, temperature=0, logit_bias={str(token): 100}, ignore_eos=True, **NO_THINK)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == app.state.tokenizer.decode([token] * 4).strip()
    assert chat(http, logit_bias={str(token): 101}).status_code == 400
    assert chat(http, logit_bias={"99999999": 1}).status_code == 400
    r = http.post("/v1/completions", json={"model": "nano", "prompt": "def f(", "suffix": "): pass"})
    assert r.status_code == 400 and "suffix" in r.json()["error"]["message"]


def test_a_tiny_temperature_is_greedy_not_nan(server):
    http, *_ = server
    body = {"max_tokens": 6, "ignore_eos": True, **NO_THINK}
    greedy = chat(http, temperature=0, **body).json()["choices"][0]["message"]["content"]
    for t in (1e-6, 1e-40):
        assert chat(http, temperature=t, **body).json()["choices"][0]["message"]["content"] == greedy


def test_completions_usage_counts_each_prompt_once_and_offsets_are_filled(server):
    http, *_ = server
    usage = [http.post("/v1/completions", json={"model": "nano", "prompt": "hello there", "max_tokens": 3, "n": n,
                                                "ignore_eos": True}).json()["usage"] for n in (1, 4)]
    assert usage[0]["prompt_tokens"] == usage[1]["prompt_tokens"]
    assert usage[1]["completion_tokens"] == 4 * usage[0]["completion_tokens"]
    choice = http.post("/v1/completions", json={"model": "nano", "prompt": "hello", "max_tokens": 4, "logprobs": 1,
                                                "ignore_eos": True}).json()["choices"][0]
    tokens, offsets = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert len(offsets) == len(tokens) == 4 and offsets[0] == 0
    assert all(choice["text"][o:].startswith(t) for o, t in zip(offsets, tokens))
    r = http.post("/v1/completions", json={"model": "nano", "prompt": "hello", "echo": True, "logprobs": 1})
    assert r.status_code == 400  # prompt logprobs are not computed: refused, not misaligned


def test_a_deeply_nested_body_is_a_400(server):
    http, *_ = server
    body = '{"model": "nano", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert http.get("/health").status_code == 200


def test_json_mode_accepts_only_json():
    from glm5.serve.json_mode import advance_text, is_complete

    start = ((), "start", "")
    for text in ('{"a":-.5}', '{"a":1.e5}', '{"a":-e5}', '{"a":"\\uZZ"}', '{"a":"\\u"}', '{"a":"\\u12"}'):
        state = advance_text(start, text)
        assert state is None or not is_complete(state), text
    for text in ('{"a":-0.5e+10}', '{"a":"\\u00e9"}', '{"a":[1,2.5,-3e2,{"b":null}]}', '{"a":0}'):
        state = advance_text(start, text)
        assert state is not None and is_complete(state), text
        json.loads(text)


def test_a_non_streaming_client_that_leaves_frees_its_request():
    torch.manual_seed(0)
    with running_server(["--preset", "nano", "--max-model-len", "4096", "--kv-cache-tokens", "8192",
                         "--threads", "1"]) as (base, app):
        llm = app.state.engine.engine
        for path, body in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "hi"})):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(base + path, json={"model": "nano", "max_tokens": 3000, "ignore_eos": True, **body},
                           timeout=1.0)
            deadline = time.monotonic() + 30
            while llm.has_unfinished() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not llm.has_unfinished(), f"{path}: the request still runs after its client left"
            assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_a_stop_string_inside_a_multi_token_step_drops_the_tokens_after_it():
    """MTP speculation emits several tokens a step; those after the token that completes a stop string are not
    part of the answer: not in usage, not in logprobs (as if the tokens had come one at a time)."""
    text = "one two three STOP four five six seven"
    results = {}
    for per_step in (1, 8):
        script: list[str] = []
        with running_server(ARGV, script=script, tokens_per_step=per_step) as (base, app):
            with httpx.Client(base_url=base, timeout=60) as http:
                script[:] = [text, text]
                body = {"stop": ["STOP"], "logprobs": True, **NO_THINK}
                reply = chat(http, **body).json()
                streamed, usage = "", None
                with http.stream("POST", "/v1/chat/completions", json={"model": "nano", "messages": HI, "stream": True,
                                 "stream_options": {"include_usage": True}, **body}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            streamed += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
                            usage = chunk.get("usage") or usage
        assert reply["choices"][0]["message"]["content"].strip() == streamed.strip() == "one two three"
        results[per_step] = (reply["usage"]["completion_tokens"], len(reply["choices"][0]["logprobs"]["content"]),
                             usage["completion_tokens"])
    assert results[8] == results[1], results
