"""One chat generation for the Anthropic Messages and OpenAI Responses routes, on the shared serving pieces.

    run = await ChatRun.start(state, messages, tools, ChatOptions(max_new_tokens=256, tool_choice="auto"))
    async for events, out in run.steps():      # parser events (ReasoningDelta, ContentDelta, ToolCall*) per step
        ...
    run.result, run.finish_reason, run.output_tokens   # the parse of everything; "stop" / "length" / "tool_calls"

Both APIs translate their request into glm5's chat messages (OpenAI-style dicts, see glm5/chat/render.py) and
their tools into OpenAI function tools; then the steps are the chat completions route's: the chat template,
the prompt's ids (inputs.prompt_ids), tool_choice forcing (inputs.forced_opening), SamplingParams
(inputs.sampling_params), the engine run (generation.generate: stop strings, aborts) and the finish reason
(generation.finish_reason). Added here: a thinking budget, and max tokens clamped to the room the context
leaves (agents such as Claude Code ask for far more than a small model's context). What differs between the
APIs, the shapes of their blocks, items and events, lives in their own modules.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field

from glm5.chat import ContentDelta
from glm5.serve.errors import APIError
from glm5.serve.generation import Choice, engine_failure, finish_reason, generate
from glm5.serve.inputs import forced_opening, prompt_ids, render_chat, sampling_params
from glm5.serve.json_mode import ThinkingBudget, ToolNameProcessor
from glm5.serve.state import ServerState
from glm5.serve.text import ChoiceText


@dataclass
class ChatOptions:
    """A request's sampling fields under SamplingParams' names (what inputs.sampling_params reads)."""

    max_new_tokens: int | None = None  # None: the server's default; more than the room left is clamped to it
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    tool_choice: str = "auto"  # auto | none | required | a tool's name
    parallel_tool_calls: bool = True
    thinking: bool = True
    thinking_budget: int | None = None  # reasoning tokens at most; then `</think>` is forced
    prefill: str = ""  # the start of the assistant's answer, given by the client (Anthropic's prefill): continued


@dataclass
class ChatRun:
    """One generation: what was sent to the engine, and (after `steps`) what came back."""

    state: ServerState
    prompt_ids: list[int]
    choice: Choice
    parallel_tool_calls: bool
    output_tokens: int = 0
    cached_tokens: int = 0
    engine_finish: str | None = None
    prefill_length: int = 0  # leading content characters that are the client's prefill, not returned

    def __post_init__(self) -> None:
        self._skip = self.prefill_length  # of them, not yet taken out of the streamed content

    @classmethod
    async def start(cls, state: ServerState, messages: list[dict], tools: list[dict] | None, options: ChatOptions,
                    prefix: str = "chat") -> ChatRun:
        """Render, encode and check the prompt and build the sampling parameters (no engine work yet)."""
        offered = tools if (tools and options.tool_choice != "none") else None
        prompt = render_chat(state, messages, offered, enable_thinking=options.thinking, status=400)
        forced, name_choices = forced_opening(offered, options.tool_choice, state.tokenizer)
        if forced and options.thinking:
            forced = "</think>" + forced  # GLM-5 does not call tools while thinking
        if options.prefill and (forced or options.thinking):
            raise APIError(400, "a final assistant message (prefill) cannot be combined with thinking or a forced "
                                "tool_choice", param="messages")
        ids = await prompt_ids(state, prompt + forced + options.prefill, param="messages")
        room = state.max_prompt_tokens + 1 - len(ids)
        wanted = options.max_new_tokens or state.config.default_max_tokens
        options = dataclasses.replace(options, max_new_tokens=min(wanted, room))
        thinking = options.thinking and not forced
        processors = [ToolNameProcessor(state.tokenizer, name_choices)] if name_choices else []
        if thinking and options.thinking_budget is not None and options.thinking_budget < options.max_new_tokens:
            processors.append(ThinkingBudget(state.tokenizer.special_token_id("</think>"), options.thinking_budget))
        params = sampling_params(state, options, len(ids), processors=processors)
        text = ChoiceText(state.tokenizer, offered, thinking, options.stop, state.hidden_ids,
                          forced=forced.removeprefix("</think>") + options.prefill)
        choice = Choice(0, f"{prefix}-{uuid.uuid4().hex}", params, text)
        # the parser reads the prefill with the continuation (a space between them is inner text, a call begun in
        # the prefill is parsed whole); the prefill's own characters are then left out of what is returned
        return cls(state, ids, choice, options.parallel_tool_calls, prefill_length=len(options.prefill.lstrip()))

    async def steps(self):
        """Run the request; yield (parser events, StepOutput) per engine step. A stop string ends it early, and so
        does a consumer that stops iterating (the engine request is aborted). An engine failure is an APIError."""
        async with generate(self.state, [(self.prompt_ids, [self.choice])]) as updates:
            async for _, out, events, _, done in updates:
                if isinstance(out, Exception):
                    raise engine_failure(out)
                self.output_tokens, self.cached_tokens = out.num_output_tokens, out.num_cached_tokens
                if done:
                    self.engine_finish = out.finish_reason
                yield self.keep(events), out
                if done:
                    return

    def keep(self, events: list) -> list:
        """Events of tool calls the request does not take (parallel_tool_calls off: calls after the first) dropped,
        and the prefill's text taken out of the content."""
        if not self.parallel_tool_calls:
            events = [e for e in events if getattr(e, "index", 0) == 0]
        if self._skip:
            kept = []
            for event in events:
                if isinstance(event, ContentDelta) and self._skip:
                    cut = min(self._skip, len(event.text))
                    self._skip -= cut
                    event = ContentDelta(event.text[cut:])
                    if not event.text:
                        continue
                kept.append(event)
            events = kept
        return events

    @property
    def result(self):
        """The parse of the whole output (reasoning, content, tool calls), after `steps` ended."""
        parsed = self.choice.text.finish()
        if self.prefill_length:
            parsed = dataclasses.replace(parsed, content=parsed.content[self.prefill_length:])
        if not self.parallel_tool_calls:
            parsed = dataclasses.replace(parsed, tool_calls=parsed.tool_calls[:1])
        return parsed

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, if one did."""
        return self.choice.text.stream.stop_string

    @property
    def finish_reason(self) -> str:
        """generation.finish_reason's, except that a tool call cut off by max tokens is "length": an agent must
        not run a call whose arguments were never finished."""
        calls = self.result.tool_calls
        if self.engine_finish == "length" and calls and (calls[-1].error or "").startswith("unclosed"):
            return "length"
        return finish_reason(self.choice, self.engine_finish, tool_calls=bool(calls))
