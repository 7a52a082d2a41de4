"""OpenAI's Responses API: the request models, input items -> glm5 chat messages, the response object and its
stream events built from the GLM-5 parser's events, and the bounded in-memory store behind previous_response_id.

    req = ResponsesRequest.model_validate(body)
    messages = req.input_messages()                         # OpenAI chat-style dicts for glm5.chat.render_messages
    builder = ResponseBuilder(skeleton)                     # skeleton: the response object without output
    events = builder.start() + [e for ev in parser_events for e in builder.feed(ev)] + builder.finish(...)
    builder.response                                        # the non-streamed response: the same items

Input items: messages (user / system / developer / assistant, text as a string or input_text / output_text
parts), `function_call` (call_id, name, arguments as JSON text), `function_call_output` (call_id, output),
`reasoning` (its reasoning_text content, else its summary). Consecutive reasoning, assistant message and
function_call items are one assistant turn (reasoning, content, tool calls), as GLM-5's template writes it.
Tools: function tools; built-in ones (web_search, local_shell, ...) are ignored, since clients such as Codex
may send them with every request. Output items: `reasoning` (content [reasoning_text]; GLM-5 writes no
summary), `message` ([output_text]),
`function_call` per tool call. The non-streamed response is folded from the same events as the stream.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from glm5.chat import ContentDelta, ReasoningDelta, ToolCallArgumentsDelta, ToolCallEnd, ToolCallStart
from glm5.serve.protocol import check_parameters_schema, check_tool_name


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    type: Literal["input_text", "output_text", "text", "summary_text", "reasoning_text"]
    text: str


class UnsupportedPart(_Model):
    type: Literal["input_image", "input_file", "input_audio", "refusal"]

    @model_validator(mode="after")
    def _unsupported(self):
        raise ValueError(f"{self.type} content is not supported: glm5 serves a text-only model")


Part = Annotated[TextPart | UnsupportedPart, Field(discriminator="type")]


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            decoded = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"arguments is not valid JSON: {err}") from None
        if not isinstance(decoded, dict):
            raise ValueError("arguments must be a JSON object")
        return value


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[Part]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ReasoningItem(_Model):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[TextPart] = Field(default_factory=list)
    content: list[TextPart] | None = None

    def text(self) -> str:
        parts = self.content or self.summary
        return "".join(p.text for p in parts)


Item = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem, Field(discriminator="type")]


def _default_message_type(value):
    # a message item may leave out "type" ({"role": "user", "content": "hi"})
    if isinstance(value, list):
        return [{**v, "type": "message"} if isinstance(v, dict) and "type" not in v and "role" in v else v
                for v in value]
    return value


class FunctionTool(_Model):
    type: Literal["function"]
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


class NamedFunction(_Model):
    type: Literal["function"]
    name: str


class Reasoning(_Model):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None


class TextFormat(_Model):
    type: Literal["text"]


class TextConfig(_Model):
    format: TextFormat | None = None


class ResponsesRequest(_Model):
    model: str = Field(min_length=1)
    input: str | list[Item]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction = "auto"
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data):
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None}  # null means the default, as OpenAI
            if "input" in data:
                data["input"] = _default_message_type(data["input"])
            if isinstance(data.get("tools"), list):  # built-in tools (web_search, local_shell, ...) are not
                data["tools"] = [t for t in data["tools"]  # served: ignored, as a client may always send them
                                 if not (isinstance(t, dict) and t.get("type") not in (None, "function"))]
        return data

    @model_validator(mode="after")
    def _check(self):
        names = [t.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if isinstance(self.tool_choice, NamedFunction) and self.tool_choice.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.name!r}, which is not in tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs at least one tool")
        if isinstance(self.input, list) and not self.input and not self.previous_response_id:
            raise ValueError("input must not be empty")
        return self

    @property
    def thinking(self) -> bool:
        """GLM-5 reasons unless reasoning.effort is 'none' or 'minimal'."""
        return self.reasoning is None or self.reasoning.effort not in ("none", "minimal")

    @property
    def chat_tool_choice(self) -> str:
        if isinstance(self.tool_choice, NamedFunction):
            return self.tool_choice.name
        return self.tool_choice if self.tools else "none"

    def chat_tools(self) -> list[dict] | None:
        if not self.tools:
            return None
        return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                  "parameters": t.parameters or {"type": "object", "properties": {}}}}
                for t in self.tools]

    def input_messages(self) -> list[dict]:
        """The input items as glm5 chat messages (instructions not included)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return items_to_messages(self.input)


def items_to_messages(items: list) -> list[dict]:
    out: list[dict] = []
    turn: dict | None = None  # the assistant turn being gathered

    def assistant() -> dict:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": ""}
            out.append(turn)
        return turn

    for item in items:
        if isinstance(item, ReasoningItem):
            current = assistant()
            if current["content"] or current.get("tool_calls"):  # reasoning after the answer: a new turn
                turn = None
                current = assistant()
            current["reasoning_content"] = current.get("reasoning_content", "") + item.text()
        elif isinstance(item, FunctionCallItem):
            assistant().setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}})
        elif isinstance(item, FunctionCallOutputItem):
            turn = None
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        elif item.role == "assistant":
            current = assistant()
            if current.get("tool_calls"):  # text after a call: a new turn
                turn = None
                current = assistant()
            current["content"] += item.text()
        else:
            turn = None
            out.append({"role": item.role, "content": item.text()})
    return out


def output_to_messages(output: list[dict]) -> list[dict]:
    """A stored response's output items as chat messages (for previous_response_id)."""
    items = []
    for item in output:
        if item["type"] == "reasoning":
            items.append(ReasoningItem(type="reasoning", content=[TextPart(**p) for p in item.get("content") or []]))
        elif item["type"] == "message":
            items.append(MessageItem(role="assistant", content="".join(p["text"] for p in item["content"])))
        elif item["type"] == "function_call":
            items.append(FunctionCallItem(type="function_call", call_id=item["call_id"], name=item["name"],
                                          arguments=item["arguments"]))
    return items_to_messages(items)


# ---- the response -------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ResponseBuilder:
    """Parser events -> Responses stream events (dicts, numbered), and the output items they add up to."""

    def __init__(self, skeleton: dict) -> None:
        self.response = {**skeleton, "status": "in_progress", "output": []}
        self.sequence = 0
        self.open: str | None = None  # the type of the item being written (the last one), or None

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> list[dict]:
        snapshot = json.loads(json.dumps(self.response))
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    @property
    def output(self) -> list[dict]:
        return self.response["output"]

    def feed(self, event) -> list[dict]:
        if isinstance(event, ReasoningDelta):
            out = self._begin("reasoning", {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                                            "status": "in_progress"}, {"type": "reasoning_text", "text": ""})
            return out + self._text_delta("response.reasoning_text.delta", event.text)
        if isinstance(event, ContentDelta):
            out = self._begin("message", {"id": new_id("msg"), "type": "message", "role": "assistant",
                                          "status": "in_progress", "content": []},
                              {"type": "output_text", "text": "", "annotations": []})
            return out + self._text_delta("response.output_text.delta", event.text)
        if isinstance(event, ToolCallStart):
            item = {"id": new_id("fc"), "type": "function_call", "call_id": new_id("call"), "name": event.name,
                    "arguments": "", "status": "in_progress"}
            return self._begin("function_call", item, None, new=True)
        if isinstance(event, ToolCallArgumentsDelta):
            item = self.output[-1]
            item["arguments"] += event.text
            return [self._event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=len(self.output) - 1, delta=event.text)]
        if isinstance(event, ToolCallEnd):
            # the final arguments are the parse's (the same JSON as the deltas unless a key was repeated)
            self.output[-1]["arguments"] = event.call.arguments_json
            return self._close()
        return []

    def finish(self, finish_reason: str, usage: dict) -> list[dict]:
        out = self._close()
        incomplete = finish_reason == "length"
        self.response["status"] = "incomplete" if incomplete else "completed"
        self.response["incomplete_details"] = {"reason": "max_output_tokens"} if incomplete else None
        self.response["usage"] = usage
        self.response["completed_at"] = None if incomplete else int(time.time())
        kind = "response.incomplete" if incomplete else "response.completed"
        return out + [self._event(kind, response=json.loads(json.dumps(self.response)))]

    def fail(self, message: str) -> dict:
        """The `response.failed` event of a stream that broke off (an engine failure)."""
        self.response.update(status="failed", error={"code": "server_error", "message": message})
        return self._event("response.failed", response=json.loads(json.dumps(self.response)))

    # ---- items --------------------------------------------------------------------------------------------
    def _begin(self, kind: str, item: dict, part: dict | None, new: bool = False) -> list[dict]:
        if self.open == kind and not new:
            return []
        out = self._close()
        self.output.append(item)
        self.open = kind
        index = len(self.output) - 1
        out.append(self._event("response.output_item.added", output_index=index, item=json.loads(json.dumps(item))))
        if part is not None:
            item["content"].append(part)
            out.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                   content_index=0, part=dict(part)))
        return out

    def _text_delta(self, kind: str, text: str) -> list[dict]:
        item = self.output[-1]
        item["content"][0]["text"] += text
        fields = {"logprobs": []} if kind == "response.output_text.delta" else {}
        return [self._event(kind, item_id=item["id"], output_index=len(self.output) - 1, content_index=0,
                            delta=text, **fields)]

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        item, index, out = self.output[-1], len(self.output) - 1, []
        if self.open == "function_call":
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                   name=item["name"], arguments=item["arguments"]))
        else:
            part = item["content"][0]
            if self.open == "message":
                out.append(self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                       content_index=0, text=part["text"], logprobs=[]))
            else:
                out.append(self._event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                       content_index=0, text=part["text"]))
            out.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=dict(part)))
        item["status"] = "completed"
        out.append(self._event("response.output_item.done", output_index=index, item=json.loads(json.dumps(item))))
        self.open = None
        return out


# ---- the store ----------------------------------------------------------------------------------------------
class ResponseStore:
    """Responses kept for previous_response_id and GET /v1/responses/{id}: least recently used evicted first
    once there are more than `max_items` or their JSON passes `max_bytes`. In memory: a restart forgets them."""

    def __init__(self, max_items: int = 1024, max_bytes: int = 64 << 20) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self.entries: OrderedDict[str, tuple[dict, list[dict], int]] = OrderedDict()
        self.bytes = 0

    def put(self, response: dict, conversation: list[dict]) -> None:
        """Keep `response` and the conversation it answered (chat messages, without its instructions)."""
        size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(conversation, ensure_ascii=False))
        if size > self.max_bytes:
            return  # larger than the whole store: not kept
        self.delete(response["id"])
        self.entries[response["id"]] = (response, conversation, size)
        self.bytes += size
        while len(self.entries) > self.max_items or self.bytes > self.max_bytes:
            _, (_, _, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        entry = self.entries.get(response_id)
        if entry is None:
            return None
        self.entries.move_to_end(response_id)
        return entry[0], entry[1]

    def delete(self, response_id: str) -> bool:
        entry = self.entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry[2]
        return entry is not None

    def __len__(self) -> int:
        return len(self.entries)
