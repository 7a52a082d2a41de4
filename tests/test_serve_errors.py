"""Errors the way OpenAI returns them, hundreds of malformed requests, and `glm5 serve` from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch
from serve_helpers import free_port, running_server

openai = pytest.importorskip("openai")

MODEL = "nano"
VALID_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
VALID_COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}

BAD_CHAT_FIELDS = {
    "model": [None, 1, "", "no-such-model", []],
    "messages": [None, [], "hi", [1], [{"role": "wizard", "content": "x"}], [{"content": "x"}], {"role": "user"},
                 [{"role": "user", "content": 5}],
                 [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
                 [{"role": "user", "content": "word " * 3000}]],
    "max_tokens": [0, -1, "ten", 1.5, 10**9],
    "max_completion_tokens": [0, -5, "x"],
    "temperature": [-1, 3, "hot"],
    "top_p": [0, 1.5, -0.1, "x"],
    "top_k": [-2, "a"],
    "min_p": [2, -1],
    "presence_penalty": [3, -3],
    "frequency_penalty": [5, "x"],
    "repetition_penalty": [0, -1],
    "n": [0, 100, "two"],
    "stop": [[""], ["a", "b", "c", "d", "e"], 5, [1]],
    "seed": ["x", 1.5, 2**70],
    "stream": ["maybe", 3, []],
    "stream_options": ["x", [1]],
    "tools": ["x", [{"type": "function"}], [{"type": "retrieval", "function": {"name": "a"}}],
              [{"type": "function", "function": {"name": "bad name!"}}],
              [{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}],
              [{"type": "function", "function": {"name": "a", "parameters": {"properties": []}}}],
              [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]],
    "tool_choice": ["sometimes", {"type": "function", "function": {"name": "missing"}}, "required", 5],
    "logprobs": ["x", [1]],
    "top_logprobs": [30, -1, 2],
    "response_format": [{"type": "xml"}, "json", {"json_schema": {}}],
    "chat_template_kwargs": [{"enable_thinking": "maybe"}, "x"],
    "thinking": [{"type": "sometimes"}, "on"],
}
BAD_COMPLETION_FIELDS = {
    "prompt": [None, [], 5, [[]], [99999], [-1], {"a": 1}, "word " * 3000],
    "logprobs": [10, -1],
    "max_tokens": [0, "x"],
    "model": ["gpt-4"],
    "echo": ["perhaps"],
}
BAD_BODIES = [b"", b"{", b"[]", b"null", b"123", b'{"model": "nano", "messages": [}', b"\xff\xfe", b'"text"']
BAD_ROUTES = [("GET", "/v1/chat/completions"), ("POST", "/v1/nope"), ("GET", "/v2/models"),
              ("DELETE", "/v1/models"), ("PUT", "/health"), ("GET", "/v1/completions/x")]


def malformed_requests():
    """(method, path, body bytes) of requests that must each get a 4xx; variants give at least 500."""
    cases = []
    for path, valid, table in (("/v1/chat/completions", VALID_CHAT, BAD_CHAT_FIELDS),
                               ("/v1/completions", VALID_COMPLETION, BAD_COMPLETION_FIELDS)):
        for field, values in table.items():
            for value in values:
                for extra in ({}, {"stream": True}, {"user": "someone"}, {"n": 2}, {"temperature": 0.5}):
                    if field in extra:
                        continue
                    if field == "top_logprobs" and value == 2:
                        extra = {**extra, "logprobs": False}
                    body = {**valid, **extra, field: value}
                    cases.append(("POST", path, json.dumps(body).encode()))
    for path in ("/v1/chat/completions", "/v1/completions"):
        for body in BAD_BODIES:
            cases += [("POST", path, body)] * 3
        cases.append(("POST", path, json.dumps({k: v for k, v in VALID_CHAT.items() if k != "model"}).encode()))
    for method, path in BAD_ROUTES:
        cases += [(method, path, json.dumps(VALID_CHAT).encode())] * 3
    return cases


@pytest.fixture(scope="module")
def server():
    with running_server(["--preset", "nano", "--max-model-len", "512", "--default-max-tokens", "4"]) as running:
        yield running


def test_at_least_500_malformed_requests_each_get_a_4xx_and_the_server_stays_healthy(server):
    base, app = server
    cases = malformed_requests()
    assert len(cases) >= 500, len(cases)
    statuses = {}
    with httpx.Client(base_url=base, timeout=60) as http:
        for method, path, body in cases:
            response = http.request(method, path, content=body, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500, (method, path, body[:200], response.status_code, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert "Traceback" not in error["message"]
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert http.get("/health").json()["status"] == "ok"
        ok = http.post("/v1/chat/completions", json=VALID_CHAT)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert {400, 404}.issubset(statuses), statuses
    engine = app.state.engine.engine
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_errors_name_the_field_and_the_reason(server):
    base, _ = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}])
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}])
    assert "tools" in err.value.body["param"]
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])


def _serve_and_ask(argv: list[str], model: str) -> str:
    with running_server(argv) as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == [model]
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                               temperature=0)
        return reply.choices[0].message.model_dump()["reasoning_content"]


def test_serve_model_dir_written_by_us_or_by_transformers(tmp_path):
    from conftest import transformers_twin

    from glm5 import GLM5Config, GLM5ForCausalLM

    torch.manual_seed(0)
    model = GLM5ForCausalLM(GLM5Config.from_preset("nano")).eval()
    model.save_pretrained(tmp_path / "ours")
    transformers_twin(model).save_pretrained(tmp_path / "theirs")
    from glm5.tokenizer import default_tokenizer

    tokenizer = default_tokenizer().save(tmp_path / "tok") / "tokenizer.json"  # neither folder has one of its own
    ours = _serve_and_ask(["--model", str(tmp_path / "ours"), "--tokenizer", str(tokenizer)], "ours")
    theirs = _serve_and_ask(["--model", str(tmp_path / "theirs"), "--tokenizer", str(tokenizer)], "theirs")
    assert ours == theirs, "same weights, same greedy text"


def test_glm5_serve_preset_nano_from_the_command_line():
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "glm5.cli", "serve", "--preset", "nano", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "glm5 serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="nano", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.usage.completion_tokens <= 3
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_speculating_server_reports_the_accept_length():
    with running_server(["--preset", "nano", "--speculative-tokens", "2"]) as (base, app):
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=12, temperature=0)
        assert reply.usage.completion_tokens == 12
        metrics = httpx.get(base + "/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("glm5_spec_decode_mean_accept_length"))
        stats = app.state.server.llm.stats
        assert stats.verify_steps > 0, "greedy decoding with --speculative-tokens 2 verified no drafts"
        accept = float(line.split()[-1])
        assert accept == pytest.approx(stats.mean_accept_length)
        # 11 tokens after the prefill's first, each verifying step giving 1 to 3 of them: the gauge is 11 / steps
        steps = round(11 / accept)
        assert 4 <= steps <= 11 and accept == pytest.approx(11 / steps, rel=1e-9), accept
