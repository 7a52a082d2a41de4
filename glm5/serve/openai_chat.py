"""POST /v1/chat/completions: OpenAI's chat API, streamed or not (the official `openai` SDK is the test client).

    curl localhost:8000/v1/chat/completions -d '{"model": "nano", "messages": [{"role": "user", "content": "hi"}]}'

Messages -> prompt (the served chat template, else glm5.chat.render_messages) -> ids -> one engine request per choice (n) -> text through
ChoiceText (incremental detokenization, stop strings, the reasoning / tool-call parser) -> `reasoning_content` /
`reasoning`, `content`, `tool_calls`. tool_choice "required" / named opens the assistant turn with the call (held
to the tool names by ToolNameProcessor); response_format json_object keeps the output a JSON object
(json_mode.py); json_schema is refused (the schema would not be enforced).
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from glm5.chat import ContentDelta, ReasoningDelta, ToolCallArgumentsDelta, ToolCallStart
from glm5.serve.errors import APIError
from glm5.serve.generation import Choice, engine_failure, finish_reason, generate, unless_disconnected
from glm5.serve.inputs import forced_opening, parse_request, prompt_ids, read_json, render_chat, sampling_params
from glm5.serve.json_mode import JSONPrefixProcessor, ToolNameProcessor
from glm5.serve.protocol import ChatCompletionRequest, new_id, now, usage
from glm5.serve.sse import DONE, event_stream, sse_event
from glm5.serve.state import ServerState, server_state
from glm5.serve.text import ChoiceText

router = APIRouter()
PATHS = ("/v1/chat/completions",)


def chat_logprobs(state: ServerState, entries) -> list[dict]:
    return [{"token": state.token_text(lp.token_id), "logprob": lp.logprob, "bytes": state.token_bytes(lp.token_id),
             "top_logprobs": [{"token": state.token_text(t), "logprob": v, "bytes": state.token_bytes(t)}
                              for t, v in lp.top]} for lp in entries]


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = server_state(request)
    req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await read_json(request, state), state)
    tokenizer, cfg = state.tokenizer, state.config
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice_mode = req.tool_choice or ("auto" if tools else "none")
    if req.response_format is not None and req.response_format.type == "json_schema":
        raise APIError(400, "response_format json_schema is not supported (the schema would not be enforced); "
                            "use {\"type\": \"json_object\"} and describe the schema in the prompt",
                       param="response_format", code="unsupported_value")
    json_mode = req.response_format is not None and req.response_format.type == "json_object"
    if json_mode and req.stop:
        raise APIError(400, "stop sequences cannot be combined with response_format json_object (a stop would cut "
                            "the object short)", param="stop", code="unsupported_value")
    thinking = req.enable_thinking and not json_mode  # the JSON is the answer: close the think block first
    prompt = render_chat(state, req.messages, tools if choice_mode != "none" else None, enable_thinking=thinking,
                         clear_thinking=req.clear_thinking)
    # the reply opens inside a think block only if the prompt opened one (a checkpoint's template may not)
    thinking = thinking and prompt.endswith("<think>")
    forced, name_choices = forced_opening(tools, choice_mode, tokenizer)
    if forced and thinking:
        forced = "</think>" + forced
    ids = await prompt_ids(state, prompt + forced, param="messages")
    parse_tools = tools if choice_mode != "none" else None
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    created, completion_id = now(), new_id("chatcmpl")
    choices = []
    for i in range(req.n):
        json_object = JSONPrefixProcessor(tokenizer, state.hidden_ids) if json_mode else None
        processors = [json_object] if json_object else []
        if name_choices:
            processors.append(ToolNameProcessor(tokenizer, name_choices))
        params = sampling_params(state, req, len(ids), i, logprobs, processors)
        if json_object:
            json_object.max_tokens = params.max_tokens  # the object is closed within the choice's budget
        text = ChoiceText(tokenizer, parse_tools, thinking and not forced, req.stop, state.hidden_ids,
                          forced=forced.removeprefix("</think>") if forced else "")
        choices.append(Choice(i, f"{completion_id}-{i}-{uuid.uuid4().hex[:8]}", params, text))
    call_ids: dict[tuple[int, int], str] = {}

    def call_id(choice: Choice, index: int) -> str:
        return call_ids.setdefault((choice.index, index), f"call_{uuid.uuid4().hex[:24]}")

    def deltas(choice: Choice, events) -> list[dict]:
        """Parser events -> OpenAI delta objects (tool calls dropped for tool_choice none / past the first one
        without parallel_tool_calls)."""
        out = []
        for ev in events:
            if isinstance(ev, ReasoningDelta):
                out.append({"reasoning_content": ev.text, "reasoning": ev.text})
            elif isinstance(ev, ContentDelta):
                out.append({"content": ev.text})
            elif choice_mode == "none" or (not req.parallel_tool_calls and getattr(ev, "index", 0) > 0):
                continue
            elif isinstance(ev, ToolCallStart):
                choice.num_tool_calls += 1
                out.append({"tool_calls": [{"index": ev.index, "id": call_id(choice, ev.index), "type": "function",
                                            "function": {"name": ev.name, "arguments": ""}}]})
            elif isinstance(ev, ToolCallArgumentsDelta):
                out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]})
        return out

    start = time.perf_counter()
    metrics = state.metrics
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index: int | None, delta: dict | None = None, logprobs_value=None, reason=None, usage_value=None):
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": cfg.model_name,
                    "choices": [] if index is None else [{"index": index, "delta": delta or {},
                                                          "logprobs": logprobs_value, "finish_reason": reason}]}
            if include_usage:
                body["usage"] = usage_value
            return sse_event(body)

        async def events():
            first = True
            prompt_tokens = completion_tokens = cached = 0
            for c in choices:
                yield chunk(c.index, {"role": "assistant", "content": ""})
            async with generate(state, [(ids, choices)]) as updates:
                async for choice, out, parsed, _, done in updates:
                    if isinstance(out, Exception):
                        yield sse_event(engine_failure(out).body())
                        continue
                    if first:
                        metrics.ttft.observe(time.perf_counter() - start)
                        first = False
                    lp = {"content": chat_logprobs(state, out.new_logprobs)} if logprobs is not None else None
                    pieces = deltas(choice, parsed)
                    for j, delta in enumerate(pieces):
                        yield chunk(choice.index, delta, lp if j == 0 else None)
                    if lp and not pieces:
                        yield chunk(choice.index, {}, lp)
                    if done:
                        choice.finish_reason = finish_reason(choice, out.finish_reason)
                        prompt_tokens, cached = out.num_prompt_tokens, out.num_cached_tokens
                        completion_tokens += out.num_output_tokens
                        yield chunk(choice.index, reason=choice.finish_reason)
            if include_usage:
                yield chunk(None, usage_value=usage(prompt_tokens or len(ids), completion_tokens, cached))
            yield DONE
            metrics.latency.observe(time.perf_counter() - start)

        return event_stream(events())

    completion_tokens, cached, first = 0, 0, True
    async with generate(state, [(ids, choices)]) as updates:
        async for choice, out, _, _, done in unless_disconnected(request, updates):
            if isinstance(out, Exception):
                raise engine_failure(out)
            if first:
                metrics.ttft.observe(time.perf_counter() - start)
                first = False
            if done:  # (set now: later updates of a choice a stop string ended are skipped)
                choice.finish_reason = finish_reason(choice, out.finish_reason, tool_calls=False)
                completion_tokens += out.num_output_tokens
                cached = out.num_cached_tokens
    result = []
    for c in choices:
        parsed = c.text.finish()
        message = {"role": "assistant", "content": parsed.content}
        if parsed.reasoning is not None:
            message["reasoning_content"] = message["reasoning"] = parsed.reasoning
        calls = [] if choice_mode == "none" else parsed.tool_calls
        if not req.parallel_tool_calls:
            calls = calls[:1]
        if calls:
            message["tool_calls"] = [call.to_openai(call_id(c, call.index)) for call in calls]
            message["content"] = parsed.content or None
        entry = {"index": c.index, "message": message, "logprobs": None,
                 "finish_reason": finish_reason(c, c.finish_reason, tool_calls=bool(calls))}
        if logprobs is not None:
            entry["logprobs"] = {"content": chat_logprobs(state, c.logprobs)}
        result.append(entry)
    metrics.latency.observe(time.perf_counter() - start)
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": cfg.model_name,
            "choices": result, "usage": usage(len(ids), completion_tokens, cached)}
