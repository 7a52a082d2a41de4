"""Hypothesis-generated hostile requests, 1,000 per route: never a 5xx, never a broken connection, and a server
that is still healthy and still answers a normal request afterwards.

Bodies: random JSON (lone surrogates, NaN, deep nesting, specials such as <|user|> in strings), a valid request
with one field replaced or dropped, a valid body with bytes flipped or cut, raw bytes; sent with odd
content types and extra headers. The server is the real one (nano, random weights) with a short context and
max_tokens, so the requests that happen to be valid generate only a few tokens.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import running_server

MODEL = "nano"
EXAMPLES = 1000
VALID = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
}
FIELDS = {
    "/v1/chat/completions": ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                             "min_p", "n", "stop", "seed", "stream", "stream_options", "tools", "tool_choice",
                             "parallel_tool_calls", "logprobs", "top_logprobs", "response_format", "logit_bias",
                             "chat_template_kwargs", "thinking", "presence_penalty", "repetition_penalty", "user"],
    "/v1/completions": ["model", "prompt", "max_tokens", "temperature", "n", "stop", "seed", "stream", "stream_options",
                        "logprobs", "echo", "suffix", "logit_bias", "top_p", "ignore_eos", "user"],
}
SPECIALS = ["<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
            "<arg_key>", "<arg_value>", "[gMASK]", "<sop>", "<|endoftext|>", "{{", "{%", "\x00", "\ufffd"]
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/json; charset=latin-1", "", "*/*", "application/json, application/json"]
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)  # (h11 sends no edge spaces)

text = st.one_of(
    # any character, lone surrogates included (st.characters leaves category Cs out unless asked for it)
    st.text(alphabet=st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=30),
    st.sampled_from(SPECIALS),
    st.lists(st.sampled_from(SPECIALS + ["a", " ", '"', "\\"]), max_size=8).map("".join),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(text, inner, max_size=4)), max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                           "content": st.one_of(text, json_values)},
                                          optional={"tool_calls": json_values, "reasoning_content": text}), max_size=3)


def encode(body, ascii_only: bool) -> bytes:
    # ensure_ascii=False writes lone surrogates as raw (invalid) UTF-8 bytes; NaN / Infinity as bare words
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def hostile_body(draw, path: str) -> bytes:
    kind = draw(st.sampled_from(["replace", "replace", "replace", "drop", "messages", "surrogate", "random", "flip",
                                 "raw"]))
    valid = dict(VALID[path])
    if kind == "surrogate":  # a lone surrogate in the text that is tokenized (escaped, or as raw bytes)
        lone = draw(st.characters(categories=["Cs"]))
        where = draw(st.text(max_size=10)) + lone + draw(st.text(max_size=10))
        if "messages" in valid:
            valid["messages"] = [{"role": "user", "content": where}]
        else:
            valid["prompt"] = draw(st.sampled_from([where, [where], ["ok", where]]))
        return encode(valid, draw(st.booleans()))
    if kind in ("replace", "drop"):
        field = draw(st.one_of(st.sampled_from(FIELDS[path]), text))
        if kind == "drop":
            valid.pop(field, None)
        else:
            valid[field] = draw(json_values)
        return encode(valid, draw(st.booleans()))
    if kind == "messages":
        key = "messages" if "messages" in valid else "prompt"
        valid[key] = draw(messages) if key == "messages" else draw(st.one_of(text, st.lists(text, max_size=3)))
        return encode(valid, draw(st.booleans()))
    if kind == "random":
        return encode(draw(json_values), draw(st.booleans()))
    if kind == "flip":
        raw = bytearray(encode(valid, True))
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw[: draw(st.integers(0, len(raw)))]) if draw(st.booleans()) else bytes(raw)
    return draw(st.binary(max_size=200))


headers = st.fixed_dictionaries({"content-type": st.one_of(st.sampled_from(CONTENT_TYPES), HEADER_TEXT)},
                                optional={"accept": HEADER_TEXT, "x-request-id": HEADER_TEXT,
                                          "authorization": HEADER_TEXT, "accept-encoding": HEADER_TEXT,
                                          "user-agent": HEADER_TEXT})


@pytest.fixture(scope="module")
def server():
    argv = ["--preset", "nano", "--max-model-len", "64", "--kv-cache-tokens", "2048", "--default-max-tokens", "2",
            "--threads", "1"]
    with running_server(argv) as (base, app):
        with httpx.Client(base_url=base, timeout=60) as http:
            yield http, app


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def check(response: httpx.Response, what) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and "Traceback" not in error["message"], error
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), (what, response.text[-300:])
        assert '"server_error"' not in response.text, (what, response.text[-300:])


def still_healthy(http: httpx.Client, app) -> None:
    assert http.get("/health").json()["status"] == "ok"
    ok = http.post("/v1/chat/completions", json=VALID["/v1/chat/completions"])
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant", ok.text
    ok = http.post("/v1/completions", json=VALID["/v1/completions"])
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1, ok.text


@pytest.mark.slow  # ~30-60 s per route on 2 busy cores (a few valid requests run the model)
@pytest.mark.parametrize("path", list(VALID))
def test_1000_hostile_bodies_per_generation_route_get_no_5xx(server, path):
    http, app = server
    statuses: dict[int, int] = {}

    @FUZZ
    @given(body=hostile_body(path), headers=headers)
    def one(body, headers):
        response = http.post(path, content=body, headers=headers)
        check(response, body[:300])
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    one()
    assert sum(statuses.values()) >= EXAMPLES and {400}.issubset(statuses), statuses
    still_healthy(http, app)


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/metrics"])
def test_1000_hostile_requests_per_status_route_get_no_5xx(server, path):
    http, app = server
    count = 0

    @FUZZ
    @given(method=st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
           query=st.dictionaries(HEADER_TEXT, HEADER_TEXT, max_size=3), body=st.binary(max_size=100), headers=headers)
    def one(method, query, body, headers):
        nonlocal count
        response = http.request(method, path, params=query, content=body or None, headers=headers)
        if method in ("GET", "HEAD"):  # a query string, a body or odd headers change nothing
            assert response.status_code == 200, (method, response.status_code, response.text[:300])
        else:
            check(response, (method, body[:100]))
            assert response.status_code in (404, 405), (method, response.status_code)
        count += 1

    one()
    assert count >= EXAMPLES
    still_healthy(http, app)
