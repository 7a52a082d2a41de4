"""Anthropic's Messages API: the request models, their translation into glm5 chat messages, and the reply's
content blocks and stream events built from the GLM-5 parser's events.

    req = MessagesRequest.model_validate(body)
    messages, tools = req.chat_messages(), req.chat_tools()        # OpenAI-style, for glm5.chat.render_messages
    builder = MessageBuilder(message_id, model, input_tokens)
    for event in parser_events: sse += builder.feed(event)         # content_block_start / _delta / _stop
    builder.finish(stop_reason, stop_sequence, output_tokens)      # message_delta, message_stop
    builder.message()                                              # the non-streamed reply: the same blocks

The non-streamed reply is folded from the same events as the stream, so both give the same message.
Mapping (GLM-5 chat format <- Anthropic):
- `system` (string or text blocks) -> a system message;
- a user message's `tool_result` blocks -> tool messages (`<|observation|><tool_response>...`), its text -> a user
  message; an assistant message's `thinking` blocks -> its reasoning, `text` -> content, `tool_use` -> tool calls.
  A tool result is not a new user turn, so the thinking of the assistant turns since the last user text is
  rendered (GLM-5's interleaved thinking across tool calls); older turns drop it, as the template does.
- reply: reasoning -> a `thinking` block (its `signature` is a digest of the text: glm5 has no secret to sign
  with, and accepts any signature back), content -> `text`, each tool call -> `tool_use` with `toolu_` ids.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from glm5.chat import ContentDelta, ReasoningDelta, ToolCallArgumentsDelta, ToolCallEnd, ToolCallStart
from glm5.serve.protocol import check_parameters_schema, check_tool_name

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error",
               429: "rate_limit_error", 499: "invalid_request_error", 500: "api_error", 503: "overloaded_error",
               529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
MAX_STOP_SEQUENCES = 16


def error_body(status: int, message: str) -> dict:
    """Anthropic's error body for an HTTP status."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control, citations, ...: accepted and not used


class TextBlock(_Model):
    type: Literal["text"]
    text: str


class ImageBlock(_Model):
    type: Literal["image", "document"]

    @model_validator(mode="after")
    def _unsupported(self):
        raise ValueError(f"{self.type} blocks are not supported: glm5 serves a text-only model")


class ToolUseBlock(_Model):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_Model):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock | ImageBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {body}" if self.is_error else body


class ThinkingBlock(_Model):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Model):
    type: Literal["redacted_thinking"]
    data: str = ""


Block = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                  Field(discriminator="type")]


class Message(_Model):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="after")
    def _blocks_fit_the_role(self):
        if isinstance(self.content, list):
            allowed = {"user": {"text", "tool_result"},
                       "assistant": {"text", "tool_use", "thinking", "redacted_thinking"}}[self.role]
            for block in self.content:
                if block.type not in allowed:
                    raise ValueError(f"a {self.role} message cannot hold a {block.type} block")
        return self


class Tool(_Model):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        return check_tool_name(value, "tool")

    @field_validator("type")
    @classmethod
    def _custom_only(cls, value):
        if value not in (None, "custom"):
            raise ValueError(f"server tools ({value}) are not supported; give custom tools with an input_schema")
        return value

    @field_validator("input_schema")
    @classmethod
    def _schema(cls, value):
        return check_parameters_schema(value, "input_schema")


class ToolChoice(_Model):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _name_for_tool(self):
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs a name")
        return self


class ThinkingConfig(_Model):
    """`enabled` with budget_tokens (the reasoning is closed after that many tokens); `adaptive` and
    `between_tools` think without a budget (GLM-5 decides); `display: omitted` returns empty thinking blocks."""

    type: Literal["enabled", "adaptive", "between_tools", "disabled"]
    budget_tokens: int | None = Field(default=None, ge=1)
    display: Literal["summarized", "omitted"] | None = None

    @model_validator(mode="after")
    def _budget(self):
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("thinking of type 'enabled' needs budget_tokens")
        return self


class Metadata(_Model):
    user_id: str | None = None


class CountTokensRequest(_Model):
    """`POST /v1/messages/count_tokens`: a Messages request without the sampling fields."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None

    @model_validator(mode="after")
    def _check(self):
        names = [t.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: names must be unique")
        choice = self.tool_choice
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not in tools")
        if choice is not None and choice.type == "any" and not names:
            raise ValueError("tool_choice 'any' needs at least one tool")
        if self.messages[0].role != "user":
            raise ValueError("the first message must use the user role")
        if self.prefill != self.prefill.rstrip():
            raise ValueError("final assistant content cannot end with trailing whitespace")
        return self

    @property
    def thinking_enabled(self) -> bool:
        """Anthropic's default is no thinking; `thinking: {type: enabled}` turns GLM-5's reasoning on."""
        return self.thinking is not None and self.thinking.type != "disabled"

    def chat_tools(self) -> list[dict] | None:
        if not self.tools:
            return None
        return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                  "parameters": t.input_schema}} for t in self.tools]

    @property
    def chat_tool_choice(self) -> str:
        choice = self.tool_choice
        if choice is None or choice.type == "auto":
            return "auto" if self.tools else "none"
        return {"any": "required", "none": "none"}.get(choice.type, choice.name)

    @property
    def prefill(self) -> str:
        """The text of a final assistant message: the start of the answer, which the model continues (only the
        continuation is returned, as Anthropic does); '' when the conversation ends on a user turn."""
        last = self.messages[-1]
        if last.role != "assistant":
            return ""
        if isinstance(last.content, str):
            return last.content
        if any(b.type != "text" for b in last.content):
            raise ValueError("a final assistant message (prefill) may only hold text blocks")
        return "".join(b.text for b in last.content)

    def chat_messages(self) -> list[dict]:
        """The conversation as glm5 chat messages (see the module docstring for the mapping); a final assistant
        message is left out (it is the prefill)."""
        out: list[dict] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            out.append({"role": "system", "content": system})
        messages = self.messages[:-1] if self.messages[-1].role == "assistant" else self.messages
        for message in messages:
            blocks = [TextBlock(type="text", text=message.content)] if isinstance(message.content, str) \
                else message.content
            if message.role == "user":
                for block in blocks:
                    if block.type == "tool_result":
                        out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
                text = "".join(b.text for b in blocks if b.type == "text")
                if text or not any(b.type == "tool_result" for b in blocks):
                    out.append({"role": "user", "content": text})
            else:
                reasoning = "".join(b.thinking for b in blocks if b.type == "thinking")
                turn = {"role": "assistant", "content": "".join(b.text for b in blocks if b.type == "text")}
                if reasoning:
                    turn["reasoning_content"] = reasoning
                calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
                         for b in blocks if b.type == "tool_use"]
                if calls:
                    turn["tool_calls"] = calls
                out.append(turn)
        return out


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    metadata: Metadata | None = None
    stream: bool = False

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value):
        value = value or []
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop_sequences")
        if any(not s for s in value):
            raise ValueError("a stop sequence must not be empty")
        return value

    @model_validator(mode="after")
    def _budget_below_max_tokens(self):
        budget = self.thinking.budget_tokens if self.thinking_enabled else None
        if budget is not None and budget >= self.max_tokens:
            raise ValueError("thinking.budget_tokens must be less than max_tokens")
        return self


# ---- the reply ----------------------------------------------------------------------------------------------
def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def signature(thinking: str) -> str:
    return hashlib.sha256(thinking.encode()).hexdigest()


class MessageBuilder:
    """Parser events -> Anthropic stream events (dicts with "type"), and the content blocks they add up to."""

    def __init__(self, message_id: str, model: str, input_tokens: int, cache_read_tokens: int = 0,
                 omit_thinking: bool = False) -> None:
        self.id, self.model = message_id, model
        self.omit_thinking = omit_thinking
        self.usage = {"input_tokens": input_tokens, "output_tokens": 0, "cache_read_input_tokens": cache_read_tokens,
                      "cache_creation_input_tokens": 0}
        self.blocks: list[dict] = []
        self.open: str | None = None  # the type of the block being written (the last one), or None
        self.partial_json: list[str] = []
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    def start(self) -> list[dict]:
        message = {"id": self.id, "type": "message", "role": "assistant", "content": [], "model": self.model,
                   "stop_reason": None, "stop_sequence": None, "usage": dict(self.usage)}
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def feed(self, event) -> list[dict]:
        out: list[dict] = []
        if isinstance(event, ReasoningDelta):
            out += self._begin("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            if not self.omit_thinking:
                self.blocks[-1]["thinking"] += event.text
                out.append(self._delta({"type": "thinking_delta", "thinking": event.text}))
        elif isinstance(event, ContentDelta):
            out += self._begin("text", {"type": "text", "text": ""})
            self.blocks[-1]["text"] += event.text
            out.append(self._delta({"type": "text_delta", "text": event.text}))
        elif isinstance(event, ToolCallStart):
            out += self._close()
            block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": event.name, "input": {}}
            out += self._begin("tool_use", block, new=True)
        elif isinstance(event, ToolCallArgumentsDelta):
            self.partial_json.append(event.text)
            out.append(self._delta({"type": "input_json_delta", "partial_json": event.text}))
        elif isinstance(event, ToolCallEnd):
            self.blocks[-1]["input"] = event.call.arguments
            out += self._close()
        return out

    def finish(self, stop_reason: str, stop_sequence: str | None, output_tokens: int) -> list[dict]:
        self.stop_reason, self.stop_sequence = stop_reason, stop_sequence
        self.usage["output_tokens"] = output_tokens
        return [*self._close(),
                # the whole usage, as Anthropic's message_delta now carries it: prefix-cache hits are only known
                # once the engine ran, after message_start
                {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                 "usage": dict(self.usage)},
                {"type": "message_stop"}]

    def message(self) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": self.blocks,
                "stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence, "usage": self.usage}

    # ---- blocks --------------------------------------------------------------------------------------------
    def _begin(self, kind: str, block: dict, new: bool = False) -> list[dict]:
        if self.open == kind and not new:
            return []
        out = self._close()
        self.blocks.append(block)
        self.open = kind
        shown = dict(block)
        return out + [{"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": shown}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        out = []
        block = self.blocks[-1]
        if self.open == "thinking":
            block["signature"] = signature(block["thinking"])
            out.append(self._delta({"type": "signature_delta", "signature": block["signature"]}))
        self.open = None
        self.partial_json = []
        return out + [{"type": "content_block_stop", "index": len(self.blocks) - 1}]
