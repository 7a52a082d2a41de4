"""A chat-completions client for any OpenAI-compatible endpoint (glm5 serve, vLLM, SGLang, a hosted API).

    client = ChatClient("http://127.0.0.1:8000/v1", model="glm5")
    reply = client.chat(messages, tools=schemas, max_tokens=1024, timeout_s=60)
    reply.reasoning, reply.content, reply.tool_calls, reply.prompt_tokens

Plain httpx, not streamed: the agent needs whole replies. Rate limits (429), overloaded or failing servers
(5xx) and dropped connections are retried twice with backoff within the call's time limit. Reasoning is read from `reasoning_content`
(GLM / Z.AI, SGLang) or `reasoning` (newer vLLM). Tool-call arguments stay the raw strings the endpoint sent:
the loop decodes them, so a malformed call is recorded as such rather than lost here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


class ModelCallError(RuntimeError):
    """The endpoint could not be reached or answered with an error (its message is kept)."""


class ModelTimeout(ModelCallError):
    """The request ran past its time limit."""


@dataclass
class RawToolCall:
    id: str
    name: str
    arguments: str  # as sent: normally a JSON string; anything else is kept as its JSON text


@dataclass
class ModelReply:
    content: str
    reasoning: str | None
    tool_calls: list[RawToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def to_message(self) -> dict:
        """The assistant message as it goes back into the history (reasoning kept: interleaved thinking)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in self.tool_calls]
        return message


def estimate_tokens(text: str) -> int:
    """Tokens of a text when the endpoint reports none (about 4 characters a token for English and code)."""
    return (len(text) + 3) // 4


class ChatClient:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 extra_body: dict | None = None, retries: int = 2):
        base_url = base_url.rstrip("/")
        if not base_url.endswith("/v1"):
            base_url += "/v1"
        self.base_url = base_url
        self.model = model
        self.extra_body = dict(extra_body or {})
        self.retries = retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers)

    def close(self) -> None:
        self._http.close()

    def resolve_model(self, timeout_s: float = 30.0) -> str:
        """The model name to send: the one given, else the endpoint's first listed model."""
        if self.model:
            return self.model
        try:
            response = self._http.get(f"{self.base_url}/models", timeout=timeout_s)
            response.raise_for_status()
            self.model = response.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
            raise ModelCallError(f"could not list the endpoint's models at {self.base_url}/models ({err}); "
                                 "give --model") from None
        return self.model

    def chat(self, messages: list[dict], tools: list[dict] | None = None, *, max_tokens: int | None = None,
             timeout_s: float = 600.0, temperature: float | None = None) -> ModelReply:
        body: dict[str, Any] = {"model": self.resolve_model(), "messages": messages, **self.extra_body}
        if tools:
            body["tools"] = tools
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        start = time.monotonic()
        deadline = start + timeout_s
        for attempt in range(self.retries + 1):
            # rate limits, overloaded servers and dropped connections are retried with backoff (1 s, 2 s, ...)
            # while the time allows; anything else, and the last failure, is the caller's
            left = deadline - time.monotonic()
            try:
                response = self._http.post(f"{self.base_url}/chat/completions", json=body, timeout=max(left, 0.001))
            except httpx.TimeoutException:
                raise ModelTimeout(f"the model call ran past {timeout_s:.0f} s") from None
            except httpx.TransportError as err:
                failure = ModelCallError(f"could not reach {self.base_url}: {err}")
            except httpx.HTTPError as err:
                raise ModelCallError(f"could not reach {self.base_url}: {err}") from None
            else:
                if response.status_code == 200:
                    break
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text[:300]
                failure = ModelCallError(f"HTTP {response.status_code} from the endpoint: {message}")
                if response.status_code not in RETRY_STATUS:
                    raise failure
            backoff = 2.0 ** attempt
            if attempt == self.retries or time.monotonic() + backoff >= deadline:
                raise failure
            time.sleep(backoff)
        seconds = time.monotonic() - start
        try:
            data = response.json()
            choice = data["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ModelCallError(f"the endpoint's reply is not a chat completion: {response.text[:300]}") from None
        calls = []
        for k, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function") or {}
            arguments = function.get("arguments", "")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            calls.append(RawToolCall(call.get("id") or f"call_{k}", str(function.get("name") or ""), arguments))
        content = message.get("content") or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        usage = data.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens")
        if prompt_tokens is None:
            prompt_tokens = estimate_tokens(json.dumps(messages))
        if completion_tokens is None:
            completion_tokens = estimate_tokens(content + (reasoning or "") + "".join(c.arguments for c in calls))
        return ModelReply(content, reasoning, calls, choice.get("finish_reason"), int(prompt_tokens),
                          int(completion_tokens), seconds)
