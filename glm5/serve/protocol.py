"""The OpenAI request and response shapes the server accepts and returns, with their validation.

Requests are pydantic models; a field that fails validation becomes a 400 `invalid_request_error` naming the
field (`param`). Unknown fields are ignored, as vLLM and SGLang do (clients send vendor extensions).
Responses are plain dicts built by the routes (openai_chat.py, openai_completions.py); the helpers here give their common pieces.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from glm5.serve.errors import APIError, validation_error  # noqa: F401  (re-exported: the routes' errors)

TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def check_tool_name(value: str, what: str = "function") -> str:
    """A tool's name as every API takes it: 1-64 letters, digits, '_', '-' or '.'."""
    if not TOOL_NAME.match(value):
        raise ValueError(f"a {what} name is 1-64 characters of letters, digits, '_', '-' or '.'")
    return value


def check_parameters_schema(value: dict | None, field: str = "parameters") -> dict | None:
    """A tool's arguments schema as every API takes it: a JSON schema of type object whose properties are
    schemas and whose `required` lists names (the chat format renders and parses arguments by it)."""
    if value is None:
        return value
    kind = value.get("type", "object")
    if kind != "object":
        raise ValueError(f"{field} must be a JSON schema of type 'object', got {kind!r}")
    properties = value.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(v, dict) for v in properties.values()):
        raise ValueError(f"{field}.properties must map each name to a JSON schema object")
    required = value.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError(f"{field}.required must be a list of property names")
    return value
MAX_N = 8
MAX_STOP = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        return check_tool_name(value)
    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value):
        return check_parameters_schema(value)


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class Thinking(_Request):
    type: Literal["enabled", "disabled"]


class _Sampling(_Request):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    user: str | None = None
    logit_bias: dict[int, float] | None = None  # OpenAI: token id (a JSON string key) -> bias in [-100, 100]

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        if value and any(not -100 <= v <= 100 for v in value.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        return value

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        # OpenAI accepts null for every optional field (temperature, n, logprobs, stream, ...): the default
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @model_validator(mode="after")
    def _options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking: Thinking | None = None

    @model_validator(mode="after")
    def _tools(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        choice = self.tool_choice
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not in tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs at least one tool")
        for key, value in (self.chat_template_kwargs or {}).items():
            if key in ("enable_thinking", "clear_thinking") and not isinstance(value, bool):
                raise ValueError(f"chat_template_kwargs.{key} must be a boolean")
        return self

    @property
    def enable_thinking(self) -> bool:
        kwargs = self.chat_template_kwargs or {}
        if "enable_thinking" in kwargs:
            return kwargs["enable_thinking"]
        if self.thinking is not None:
            return self.thinking.type == "enabled"
        return True

    @property
    def clear_thinking(self) -> bool:
        return (self.chat_template_kwargs or {}).get("clear_thinking", True)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix is not None:
            raise ValueError("suffix is not supported")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (the prompt tokens have no logprobs)")
        return self

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("the prompt must not be empty")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
