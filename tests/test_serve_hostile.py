"""The server under hostile input: lone surrogates, huge prompts, metrics that tell the truth, JSON mode's limits."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
from serve_helpers import running_server

MODEL = "nano"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def server():
    argv = ["--preset", "nano", "--max-model-len", "512", "--kv-cache-tokens", "4096", "--default-max-tokens", "4"]
    with running_server(argv) as running:
        yield running


def raw_chat(content_json: str, **extra) -> bytes:
    """A chat body whose message content is the given JSON text (so escapes reach the server as written)."""
    rest = "".join(f', "{k}": {v}' for k, v in extra.items())
    return f'{{"model": "{MODEL}", "max_tokens": 2, "messages": [{{"role": "user", "content": {content_json}}}]{rest}}}'.encode()


LONE_SURROGATES = [
    (CHAT, raw_chat('"hi \\ud800 there"')),
    (CHAT, raw_chat('"\\udfff"')),
    (CHAT, raw_chat('[{"type": "text", "text": "\\ud83d"}]')),  # a high surrogate with no low one after it
    (CHAT, raw_chat('"hi"', stop='["\\ud800"]')),
    (CHAT, raw_chat('"hi"', user='"\\udc00"')),
    (CHAT, b'{"model": "nano", "messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}'),
    (CHAT, raw_chat('"hi"', tools='[{"type": "function", "function": {"name": "f", "description": "\\ud800"}}]')),
    (COMPLETIONS, b'{"model": "nano", "max_tokens": 2, "prompt": "abc \\ud800"}'),
    (COMPLETIONS, b'{"model": "nano", "max_tokens": 2, "prompt": ["ok", "\\udbff"]}'),
    (COMPLETIONS, b'{"model": "nano", "max_tokens": 2, "prompt": "x", "stop": "\\ud800"}'),
]
RAW_INVALID_UTF8 = [
    (CHAT, b'{"model": "nano", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),  # surrogate as UTF-8
    (CHAT, b'{"model": "nano", "messages": [{"role": "user", "content": "hi"}], "user": "\xed\xb0\x80"}'),
    (CHAT, b'{"model": "nano", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    (COMPLETIONS, b'{"model": "nano", "prompt": "caf\xe9"}'),  # Latin-1, not UTF-8
    (COMPLETIONS, b'{"model": "nano", "prompt": "\xc3"}'),  # a cut multi-byte character
]


@pytest.mark.parametrize("path, body", LONE_SURROGATES + RAW_INVALID_UTF8)
def test_a_lone_surrogate_or_invalid_utf8_is_a_400_and_the_connection_stays_usable(server, path, body):
    base, _ = server
    with httpx.Client(base_url=base, timeout=60) as http:
        bad = http.post(path, content=body, headers={"content-type": "application/json"})
        assert bad.status_code == 400, (bad.status_code, bad.text)
        error = bad.json()["error"]
        assert error["code"] in ("invalid_unicode", "invalid_json"), error
        assert "Traceback" not in error["message"]
        # the same keep-alive connection answers the next request
        ok = http.post(path, json={"model": MODEL, "max_tokens": 2, **(
            {"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else {"prompt": "hi"})})
        assert ok.status_code == 200, ok.text
        assert bad.headers.get("connection") != "close"


def test_a_valid_surrogate_pair_is_text_not_an_error(server):
    base, _ = server
    ok = httpx.post(base + CHAT, content=raw_chat('"smile \\ud83d\\ude00"'), headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] > 5


class SpyTokenizer:
    """The server's tokenizer, recording the size of each text it encodes and whether an event loop ran there."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def _record(self, text):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        self.calls.append((len(text.encode("utf-8", "surrogatepass")), on_loop))

    def encode(self, text, **kwargs):
        self._record(text)
        return self.real.encode(text, **kwargs)

    def encode_batch(self, texts, **kwargs):
        for t in texts:
            self._record(t)
        return self.real.encode_batch(texts, **kwargs)


@pytest.fixture()
def spy(server):
    state = server[1].state.server
    real = state.tokenizer
    state.tokenizer = SpyTokenizer(real)
    try:
        yield state.tokenizer
    finally:
        state.tokenizer = real


def test_a_prompt_far_over_the_context_is_refused_before_it_is_tokenized(server, spy):
    base, app = server
    big = "word " * 700_000  # 3.5 MB: at most 511 tokens of <= max_token_bytes bytes fit
    state = app.state.server
    assert len(big) > state.max_prompt_tokens * state.max_token_bytes
    for path, body, param in ((CHAT, {"messages": [{"role": "user", "content": big}]}, "messages"),
                              (COMPLETIONS, {"prompt": big}, "prompt")):
        r = httpx.post(base + path, json={"model": MODEL, **body}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert r.json()["error"]["param"] == param
    assert all(size < 1 << 20 for size, _ in spy.calls), f"a huge prompt was tokenized: {spy.calls}"


def test_an_over_long_prompt_names_its_own_field(server):
    base, _ = server
    long_text = "word " * 3000  # within the byte bound, over 512 tokens once tokenized
    chat = httpx.post(base + CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": long_text}]})
    completion = httpx.post(base + COMPLETIONS, json={"model": MODEL, "prompt": long_text})
    ids = httpx.post(base + COMPLETIONS, json={"model": MODEL, "prompt": [1] * 600})
    for response, param in ((chat, "messages"), (completion, "prompt"), (ids, "prompt")):
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"


def test_a_long_prompt_is_tokenized_off_the_event_loop(server, spy):
    base, _ = server
    long_text = "word " * 8000  # 40 KB: over the off-loop threshold, under the byte bound
    short = "hello"
    for text in (long_text, short):
        httpx.post(base + COMPLETIONS, json={"model": MODEL, "prompt": text, "max_tokens": 1}, timeout=60)
    sizes = {size: on_loop for size, on_loop in spy.calls}
    assert sizes[len(long_text)] is False, "the 40 KB prompt was tokenized on the event loop"
    assert sizes[len(short)] is True  # (a short one is not worth a thread hop)


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def test_gauges_fall_to_zero_when_clients_leave_and_5xx_answers_are_counted(server):
    base, app = server
    state = app.state.server
    with httpx.Client(base_url=base, timeout=60) as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 400}
        with http.stream("POST", CHAT, json=body) as response:
            lines = response.iter_lines()
            for _ in range(4):
                next(lines)
            busy = http.get("/metrics").text
            assert metric(busy, "glm5_num_requests_running") == 1
            assert metric(busy, "glm5_kv_cache_usage") > 0
        for _ in range(200):  # the engine sees the abort at its next turn; no step follows it
            if state.llm.num_running == 0:
                break
            time.sleep(0.05)
        idle = http.get("/metrics").text
        assert metric(idle, "glm5_num_requests_running") == 0
        assert metric(idle, "glm5_num_requests_waiting") == 0
        assert metric(idle, "glm5_kv_cache_usage") == 0

        label = '{route="/v1/chat/completions",status="500"}'
        before = metric(idle, "glm5_requests_total", label) if label in idle else 0.0
        real = state.llm.validate_prompt

        def broken(ids):
            raise RuntimeError("a bug")

        state.llm.validate_prompt = broken
        try:
            failed = http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        finally:
            state.llm.validate_prompt = real
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        assert "a bug" not in failed.text  # the client learns the kind of failure, not the server's internals
        assert metric(http.get("/metrics").text, "glm5_requests_total", label) == before + 1
        assert http.get("/health").json()["status"] == "ok"


def test_json_schema_is_refused_not_ignored_and_json_mode_takes_no_stop(server):
    base, _ = server
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    r = httpx.post(base + CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                      "response_format": schema})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert "json_schema" in r.json()["error"]["message"]
    r = httpx.post(base + CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                      "response_format": {"type": "json_object"}, "stop": ["}"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
