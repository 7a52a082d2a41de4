"""One chat generation for the Anthropic Messages and OpenAI Responses routes: prompt, sampling, engine, parser.

    run = ChatRun.start(state, messages, tools, ChatOptions(max_tokens=256, temperature=0.7, tool_choice="auto"))
    async for events, out in run.steps():        # parser events (ReasoningDelta, ContentDelta, ToolCall*) per step
        ...
    run.result, run.finish_reason, run.output_tokens   # the parse of everything, "stop" / "length" / "tool_calls"

Both APIs translate their request into glm5's chat messages (OpenAI-style dicts, see glm5/chat/render.py) and
their tools into OpenAI function tools, then share everything here: the chat template, tool_choice forcing
(the assistant turn is made to open with `<tool_call>` for "required" / a named tool), the thinking budget,
stop strings, the engine request (aborted when the consumer stops early), and the streaming parser. What
differs between the APIs (the event and block shapes) lives in their own modules.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field

from glm5.chat import render_messages
from glm5.engine.sequence import SamplingParams
from glm5.serve.async_engine import EngineError
from glm5.serve.json_mode import ThinkingBudget, ToolNameProcessor
from glm5.serve.text import ChoiceText


class ChatRequestError(ValueError):
    """The request cannot be served as asked (status 400 unless given); each API words it in its own body."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass
class ChatOptions:
    max_tokens: int | None = None  # None: the server's default; over the room left it is clamped to it
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    tool_choice: str = "auto"  # auto | none | required | a tool's name (forced)
    parallel_tool_calls: bool = True
    thinking: bool = True
    thinking_budget: int | None = None  # reasoning tokens at most; then `</think>` is forced
    seed: int | None = None


def tool_forcing(tools: list[dict] | None, tool_choice: str, thinking: bool, tokenizer) -> tuple[str, dict | None]:
    """(text the assistant turn is made to open with, {name: id of the tag after it} for ToolNameProcessor).

    A named tool (or "required" with one tool): `<tool_call>name` and the tag that must follow the name
    (`<arg_key>`, or `</tool_call>` for a tool without parameters). "required" with several tools:
    `<tool_call>` and the name held to one of them. Thinking is closed first: GLM-5 does not call tools
    while thinking."""
    if not tools or tool_choice in ("auto", "none"):
        return "", None
    names = [t["function"]["name"] for t in tools]
    forced_name = tool_choice if tool_choice != "required" else (names[0] if len(names) == 1 else None)
    name_choices = None

    def has_parameters(name: str) -> bool:
        schema = next(t["function"].get("parameters") or {} for t in tools if t["function"]["name"] == name)
        return bool(schema.get("properties"))

    if forced_name is not None:
        forced = f"<tool_call>{forced_name}" + ("<arg_key>" if has_parameters(forced_name) else "</tool_call>")
    else:
        forced = "<tool_call>"
        name_choices = {n: tokenizer.special_token_id("<arg_key>" if has_parameters(n) else "</tool_call>")
                        for n in names}
    return ("</think>" + forced if thinking else forced), name_choices


@dataclass
class ChatRun:
    """One generation: what was sent to the engine, and (after `steps`) what came back."""

    engine: object
    prompt_ids: list[int]
    params: SamplingParams
    text: ChoiceText
    request_id: str
    tool_choice: str
    parallel_tool_calls: bool
    output_tokens: int = 0
    cached_tokens: int = 0
    engine_finish: str | None = None
    done: bool = False

    @classmethod
    def start(cls, state, messages: list[dict], tools: list[dict] | None, options: ChatOptions,
              prefix: str = "chat") -> ChatRun:
        """Render, encode and check the prompt and build the sampling parameters (no engine work yet).
        `state` is the app's state: .engine (AsyncEngine), .tokenizer, .config (ServerConfig)."""
        engine, tokenizer, cfg = state.engine, state.tokenizer, state.config
        llm = engine.engine
        offered = tools if (tools and options.tool_choice != "none") else None
        try:
            prompt = render_messages(messages, offered, enable_thinking=options.thinking)
        except (ValueError, TypeError, KeyError) as err:
            raise ChatRequestError(f"messages cannot be rendered: {err}") from None
        forced, name_choices = tool_forcing(offered, options.tool_choice, options.thinking, tokenizer)
        prompt_ids = tokenizer.encode(prompt + forced, allow_special=True)
        try:
            llm.validate_prompt(prompt_ids)
        except ValueError as err:
            raise ChatRequestError(str(err)) from None
        room = min(llm.max_model_len, llm.capacity_tokens) - len(prompt_ids)
        max_tokens = min(options.max_tokens or cfg.default_max_tokens, room)
        processors = []
        if name_choices:
            processors.append(ToolNameProcessor(tokenizer, name_choices))
        thinking = options.thinking and not forced
        if thinking and options.thinking_budget is not None and options.thinking_budget < max_tokens:
            processors.append(ThinkingBudget(tokenizer.special_token_id("</think>"), options.thinking_budget))
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=options.temperature, top_p=options.top_p,
                                    top_k=options.top_k, seed=options.seed, logits_processors=processors)
        except ValueError as err:
            raise ChatRequestError(str(err)) from None
        hidden_ids = set(tokenizer.eos_token_ids)
        text = ChoiceText(tokenizer, offered, thinking, options.stop, hidden_ids,
                          forced=forced.removeprefix("</think>"))
        return cls(engine, prompt_ids, params, text, f"{prefix}-{uuid.uuid4().hex}", options.tool_choice,
                   options.parallel_tool_calls)

    async def steps(self):
        """Run the request; yield (parser events, StepOutput) per engine step. A stop string ends it early
        (the tokens after it are dropped and the request aborted); so does a consumer that stops iterating."""
        generator = self.engine.generate(self.prompt_ids, self.params, self.request_id)
        try:
            async for out in generator:
                events = self.text.push(out.new_token_ids, out.finished)
                used = self.text.stream.used
                if used < len(out.new_token_ids):  # a stop string ended inside a multi-token (MTP) step
                    out = dataclasses.replace(out, new_token_ids=out.new_token_ids[:used],
                                              num_output_tokens=out.num_output_tokens - (len(out.new_token_ids) - used))
                self.output_tokens, self.cached_tokens = out.num_output_tokens, out.num_cached_tokens
                self.done = out.finished or self.text.stopped
                if self.done:
                    self.engine_finish = "stop" if self.text.stopped else out.finish_reason
                yield self.keep(events), out
                if self.done:
                    return
        except EngineError as err:
            raise ChatRequestError(str(err), 500, "server_error") from None
        finally:
            await generator.aclose()  # aborts the engine request unless it finished

    def keep(self, events: list) -> list:
        """Events of tool calls the request does not take (parallel_tool_calls off: calls after the first) dropped."""
        if self.parallel_tool_calls:
            return events
        return [e for e in events if getattr(e, "index", 0) == 0]

    @property
    def result(self):
        """The parse of the whole output (reasoning, content, tool calls), after `steps` ended."""
        parsed = self.text.finish()
        if not self.parallel_tool_calls:
            parsed = dataclasses.replace(parsed, tool_calls=parsed.tool_calls[:1])
        return parsed

    @property
    def stop_string(self) -> str | None:
        return self.text.stream.stop_string

    @property
    def finish_reason(self) -> str:
        """tool_calls when the output called a tool, else the engine's stop / length (a stop string is stop)."""
        if self.result.tool_calls:
            return "tool_calls"
        return self.engine_finish or "stop"
