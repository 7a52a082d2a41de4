"""The OpenAI-compatible HTTP server (FastAPI): chat and text completions over the engine, streamed or not.

    glm5 serve --preset nano --port 8000          # random weights, default tokenizer
    glm5 serve --model runs/demo/model            # a checkpoint (ours or transformers')

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics.
The engine works on ids on its own thread (serve/async_engine.py); everything textual happens here: the chat
template (glm5.chat.render_messages), incremental detokenization and stop strings (serve/text.py), and the
reasoning / tool-call parser (glm5.chat.StreamingParser). Every error is an OpenAI error body
{"error": {"message", "type", "param", "code"}} (400 bad field or too long a prompt, 404 unknown model or
route, 422 messages that are well-formed but cannot be rendered, 500 engine failure); never a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm5.chat import ContentDelta, ReasoningDelta, ToolCallArgumentsDelta, ToolCallStart, render_messages
from glm5.engine.sequence import SamplingParams
from glm5.serve import anthropic, responses
from glm5.serve.anthropic_protocol import error_body as anthropic_error_body
from glm5.serve.async_engine import AsyncEngine, EngineError
from glm5.serve.json_mode import JSONPrefixProcessor, LogitBias, ToolNameProcessor
from glm5.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    new_id,
    now,
    usage,
    validation_error,
)
from glm5.serve.responses_protocol import ResponseStore
from glm5.serve.text import ChoiceText, TextStream

log = logging.getLogger("glm5.serve")
MAX_BODY_BYTES = 4 << 20


@dataclass
class ServerConfig:
    model_name: str = "glm5"
    default_max_tokens: int = 256
    max_body_bytes: int = MAX_BODY_BYTES
    responses_store_items: int = 1024  # stored Responses API responses (previous_response_id) at most
    responses_store_bytes: int = 64 << 20  # and their JSON at most; least recently used evicted first


class Metrics:
    """Prometheus metrics in a registry of their own (several servers can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("glm5_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("glm5_prompt_tokens", "prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter("glm5_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("glm5_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.latency = Histogram("glm5_request_latency_seconds", "request latency", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.running = Gauge("glm5_num_requests_running", "sequences in the running batch", registry=r)
        self.waiting = Gauge("glm5_num_requests_waiting", "sequences waiting", registry=r)
        self.cache_usage = Gauge("glm5_kv_cache_usage", "fraction of KV cache blocks in use", registry=r)
        self.accept_length = Gauge("glm5_spec_decode_mean_accept_length",
                                   "MTP speculation: tokens per verifying step (1 + accepted drafts)", registry=r)
        self.step_seconds = Histogram("glm5_engine_step_seconds", "engine step time", registry=r,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))


@dataclass
class Choice:
    """One generation (one of n) of a request."""

    index: int
    request_id: str
    params: SamplingParams
    text: ChoiceText | TextStream
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    num_tool_calls: int = 0
    task: asyncio.Task | None = None


async def drain(updates: asyncio.Queue, runners: int = 1):
    """The engine's updates applied to their choices until all `runners` (see run_choices) are done.

    Yields (choice, out, pushed, first, done): `pushed` is what the choice's text returned for the new tokens
    (a str, or parser events for chat), `first` marks the choice's first tokens, `done` its last update (the
    engine finished, or a stop string ended it: then its request is aborted). An engine failure comes through
    as (choice, exception, None, False, False). A choice whose finish_reason is set is skipped: the consumer
    sets it when `done`.
    """
    while runners:
        item = await updates.get()
        if item is None:
            runners -= 1
            continue
        choice, out = item
        if isinstance(out, Exception):
            yield choice, out, None, False, False
            continue
        if choice.finish_reason is not None:
            continue  # ended early by a stop string
        pushed = choice.text.push(out.new_token_ids, out.finished)
        stream = getattr(choice.text, "stream", choice.text)
        if stream.used < len(out.new_token_ids):  # a stop string ended inside a multi-token step: drop the rest
            dropped = len(out.new_token_ids) - stream.used
            out = dataclasses.replace(out, new_token_ids=out.new_token_ids[: stream.used],
                                      new_logprobs=out.new_logprobs[: stream.used],
                                      num_output_tokens=out.num_output_tokens - dropped)
        done = out.finished or choice.text.stopped
        if done and not out.finished:
            choice.task.cancel()
        first = not choice.tokens
        choice.tokens.extend(out.new_token_ids)
        choice.logprobs.extend(out.new_logprobs)
        yield choice, out, pushed, first, done


async def unless_disconnected(request: Request, items):
    """Yield from the async iterator `items` until the client disconnects; then raise, so the caller's `finally`
    aborts its engine requests instead of generating for nobody (vLLM's listen_for_disconnect does the same)."""

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    items = aiter(items)
    try:
        while True:
            step = asyncio.ensure_future(anext(items))
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                raise APIError(499, "the client closed the connection", code="client_closed")
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        watcher.cancel()


def create_app(engine: AsyncEngine, tokenizer, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) with `tokenizer` for the text side."""
    cfg = config or ServerConfig()
    metrics = Metrics()
    app = FastAPI(title="glm5", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.tokenizer, app.state.metrics, app.state.config = engine, tokenizer, metrics, cfg
    llm = engine.engine
    hidden_ids = set(tokenizer.eos_token_ids)
    token_text_cache: dict[int, str] = {}

    def on_step(outputs, seconds):
        metrics.step_seconds.observe(seconds)
        metrics.running.set(llm.num_running)
        metrics.waiting.set(llm.num_waiting)
        bm = llm.block_manager
        metrics.cache_usage.set(1 - bm.num_free_blocks / bm.num_blocks)
        metrics.generation_tokens.inc(sum(len(o.new_token_ids) for o in outputs))
        if llm.drafter is not None:
            metrics.accept_length.set(llm.stats.mean_accept_length)

    engine.on_step = on_step

    # ------------------------------------------------------------------ errors
    def error_response(err: APIError, path: str = "") -> JSONResponse:
        """The error in the body of the API the path belongs to (Anthropic's under /v1/messages, else OpenAI's)."""
        if path.startswith(anthropic.ROUTES[0]):
            return JSONResponse(anthropic_error_body(err.status, err.message), status_code=err.status)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err, request.url.path)

    @app.exception_handler(anthropic.AnthropicError)
    async def _anthropic_error(request: Request, err: anthropic.AnthropicError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            return error_response(APIError(404, f"no route {request.method} {request.url.path}", "not_found_error",
                                           code="unknown_route"), request.url.path)
        return error_response(APIError(err.status_code, str(err.detail), "invalid_request_error"), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return error_response(APIError(422, str(err.errors()[:1]), "invalid_request_error", code="unprocessable"),
                              request.url.path)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(err).__name__}", "server_error"), request.url.path)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            response = error_response(APIError(413, f"request body over {cfg.max_body_bytes} bytes", code="too_large"),
                                      request.url.path)
        else:
            response = await call_next(request)
        route = request.url.path if request.url.path in KNOWN_ROUTES else "other"
        metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            raise APIError(413, f"request body over {cfg.max_body_bytes} bytes", code="too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise APIError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def parse(model_cls, body: dict):
        try:
            req = model_cls.model_validate(body)
        except ValidationError as err:
            raise validation_error(err) from None
        if req.model != cfg.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {cfg.model_name!r}",
                           "not_found_error", "model", "model_not_found")
        return req

    # ------------------------------------------------------------------ simple routes
    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response(APIError(503, "the engine thread is not running", "server_error"))
        return {"status": "ok", "running": llm.num_running, "waiting": llm.num_waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": START_TIME,
                                            "owned_by": "glm5", "max_model_len": llm.max_model_len}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ shared generation pieces
    def sampling_params(req, prompt_len: int, index: int, logprobs: int | None, processors=None) -> SamplingParams:
        room = llm.max_model_len - prompt_len
        max_tokens = req.max_new_tokens
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {llm.max_model_len} tokens; the prompt has "
                                f"{prompt_len} and {max_tokens} more were requested", param="max_tokens",
                           code="context_length_exceeded")
        seed = None if req.seed is None else (req.seed + index) % (2**63)
        if req.logit_bias:
            if any(not 0 <= t < llm.config.vocab_size for t in req.logit_bias):
                raise APIError(400, f"logit_bias token ids must be in [0, {llm.config.vocab_size})", param="logit_bias")
            processors = [*(processors or []), LogitBias(req.logit_bias)]
        try:
            return SamplingParams(
                max_tokens=max_tokens or max(1, min(cfg.default_max_tokens, room)), temperature=req.temperature,
                top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty, seed=seed,
                ignore_eos=req.ignore_eos, logprobs=logprobs, logits_processors=processors or [],
            )
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def encode_prompt(text: str) -> list[int]:
        ids = tokenizer.encode(text, allow_special=True)
        check_prompt(ids)
        return ids

    def check_prompt(ids: list[int]) -> None:
        try:
            llm.validate_prompt(ids)
        except ValueError as err:
            code = "context_length_exceeded" if "context" in str(err) else "invalid_prompt"
            raise APIError(400, str(err), param="messages" if code else "prompt", code=code) from None

    byte_level = type(getattr(tokenizer, "backend", None) and tokenizer.backend.decoder).__name__ == "ByteLevel"
    token_bytes_cache: dict[int, list[int]] = {}

    def token_bytes(token_id: int) -> list[int]:
        """The token's own UTF-8 bytes (OpenAI's `bytes`): also for a token holding part of a character."""
        raw = token_bytes_cache.get(token_id)
        if raw is None:
            piece = tokenizer.id_to_token(token_id) if byte_level else None
            if piece is not None and all(ch in BYTE_DECODER for ch in piece):
                raw = [BYTE_DECODER[ch] for ch in piece]
            else:
                raw = list(token_text(token_id).encode())
            token_bytes_cache[token_id] = raw
        return raw

    def token_text(token_id: int) -> str:
        text = token_text_cache.get(token_id)
        if text is None:
            text = token_text_cache[token_id] = tokenizer.decode([token_id])
        return text

    async def run_choices(choices: list[Choice], prompt_ids: list[int], updates: asyncio.Queue) -> None:
        """Drive every choice's engine request, putting (choice, StepOutput | Exception) on `updates`, then None.
        A consumer that ends a choice early (a stop string) cancels `choice.task`, which aborts the request."""

        async def one(choice: Choice):
            try:
                async for out in engine.generate(prompt_ids, choice.params, choice.request_id):
                    await updates.put((choice, out))
            except (EngineError, ValueError) as err:
                await updates.put((choice, err))

        for c in choices:
            c.task = asyncio.create_task(one(c))
        try:
            await asyncio.gather(*(c.task for c in choices), return_exceptions=True)
        finally:
            for c in choices:
                c.task.cancel()
            await updates.put(None)

    def chat_logprobs(choice: Choice, entries) -> list[dict]:
        out = []
        for lp in entries:
            text = token_text(lp.token_id)
            out.append({"token": text, "logprob": lp.logprob, "bytes": token_bytes(lp.token_id),
                        "top_logprobs": [{"token": token_text(t), "logprob": v, "bytes": token_bytes(t)}
                                         for t, v in lp.top]})
        return out

    # ------------------------------------------------------------------ chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request))
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice_mode = req.tool_choice or ("auto" if tools else "none")
        json_mode = req.response_format is not None and req.response_format.type != "text"
        thinking = req.enable_thinking and not json_mode  # the JSON is the answer: close the think block first
        try:
            prompt = render_messages(req.messages, tools if choice_mode != "none" else None,
                                     enable_thinking=thinking, clear_thinking=req.clear_thinking)
        except (ValueError, TypeError, KeyError) as err:
            raise APIError(422, f"messages cannot be rendered: {err}", param="messages", code="invalid_messages") from None
        # tool_choice required / named: the assistant turn is made to open with a tool call
        forced = ""
        forced_name, name_choices = None, None
        if isinstance(choice_mode, NamedToolChoice):
            forced_name = choice_mode.function.name
        elif choice_mode == "required" and len(tools) == 1:
            forced_name = tools[0]["function"]["name"]
        if forced_name is not None:
            # the name is complete once the first argument key (or the end of the call) follows it
            schema = next(t["function"].get("parameters") or {} for t in tools if t["function"]["name"] == forced_name)
            forced = f"<tool_call>{forced_name}" + ("<arg_key>" if schema.get("properties") else "</tool_call>")
        elif choice_mode == "required":
            forced = "<tool_call>"  # several tools: the model picks the name, held to one of them
            name_choices = {t["function"]["name"]: tokenizer.special_token_id(
                "<arg_key>" if (t["function"].get("parameters") or {}).get("properties") else "</tool_call>")
                for t in tools}
        if forced and thinking:
            forced = "</think>" + forced
        prompt_ids = encode_prompt(prompt + forced)
        parse_tools = tools if choice_mode != "none" else None
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        created, completion_id = now(), new_id("chatcmpl")
        choices = []
        for i in range(req.n):
            processors = [JSONPrefixProcessor(tokenizer, hidden_ids)] if json_mode else []
            if name_choices:
                processors.append(ToolNameProcessor(tokenizer, name_choices))
            params = sampling_params(req, len(prompt_ids), i, logprobs, processors)
            text = ChoiceText(tokenizer, parse_tools, thinking and not forced, req.stop, hidden_ids,
                              forced=forced.removeprefix("</think>") if forced else "")
            choices.append(Choice(i, f"{completion_id}-{i}-{uuid.uuid4().hex[:8]}", params, text))
        metrics.prompt_tokens.inc(len(prompt_ids) * req.n)
        call_ids = {}

        def call_id(choice: Choice, index: int) -> str:
            return call_ids.setdefault((choice.index, index), f"call_{uuid.uuid4().hex[:24]}")

        def deltas(choice: Choice, events) -> list[dict]:
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

        def finish_reason(choice: Choice, out) -> str:
            if choice.num_tool_calls:
                return "tool_calls"
            if choice.text.stream.stopped:
                return "stop"
            return out.finish_reason or "stop"

        start = time.perf_counter()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def sse():
                updates: asyncio.Queue = asyncio.Queue()
                runner = asyncio.create_task(run_choices(choices, prompt_ids, updates))
                first = True
                prompt_tokens = completion_tokens = cached = 0

                def chunk(choice_list, usage_value=None):
                    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": cfg.model_name, "choices": choice_list}
                    if include_usage:
                        body["usage"] = usage_value
                    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

                try:
                    for c in choices:
                        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                    async for choice, out, events, _, done in drain(updates):
                        if isinstance(out, Exception):
                            body = APIError(500 if isinstance(out, EngineError) else 400, str(out),
                                            "server_error" if isinstance(out, EngineError) else "invalid_request_error").body()
                            yield f"data: {json.dumps(body)}\n\n"
                            continue
                        if first:
                            metrics.ttft.observe(time.perf_counter() - start)
                            first = False
                        lp = {"content": chat_logprobs(choice, out.new_logprobs)} if logprobs is not None else None
                        pieces = deltas(choice, events)
                        for j, delta in enumerate(pieces):
                            yield chunk([{"index": choice.index, "delta": delta,
                                          "logprobs": lp if j == 0 else None, "finish_reason": None}])
                        if lp and not pieces:
                            yield chunk([{"index": choice.index, "delta": {}, "logprobs": lp, "finish_reason": None}])
                        if done:
                            choice.finish_reason = finish_reason(choice, out)
                            prompt_tokens, cached = out.num_prompt_tokens, out.num_cached_tokens
                            completion_tokens += out.num_output_tokens
                            yield chunk([{"index": choice.index, "delta": {}, "logprobs": None,
                                          "finish_reason": choice.finish_reason}])
                    if include_usage:
                        yield chunk([], usage(prompt_tokens or len(prompt_ids), completion_tokens, cached))
                    yield "data: [DONE]\n\n"
                    metrics.latency.observe(time.perf_counter() - start)
                finally:
                    runner.cancel()

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        updates: asyncio.Queue = asyncio.Queue()
        runner = asyncio.create_task(run_choices(choices, prompt_ids, updates))
        completion_tokens, cached, first = 0, 0, True
        try:
            async for choice, out, _, _, done in unless_disconnected(request, drain(updates)):
                if isinstance(out, EngineError):
                    raise APIError(500, str(out), "server_error")
                if isinstance(out, Exception):
                    raise APIError(400, str(out))
                if first:
                    metrics.ttft.observe(time.perf_counter() - start)
                    first = False
                if done:
                    choice.finish_reason = "stop" if choice.text.stopped else out.finish_reason
                    completion_tokens += out.num_output_tokens
                    cached = out.num_cached_tokens
        finally:
            runner.cancel()
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
            reason = "tool_calls" if calls else ("stop" if c.text.stream.stopped else c.finish_reason or "stop")
            entry = {"index": c.index, "message": message, "logprobs": None, "finish_reason": reason}
            if logprobs is not None:
                entry["logprobs"] = {"content": chat_logprobs(c, c.logprobs)}
            result.append(entry)
        metrics.latency.observe(time.perf_counter() - start)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": cfg.model_name,
                "choices": result, "usage": usage(len(prompt_ids), completion_tokens, cached)}

    # ------------------------------------------------------------------ text completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompt_ids_list = []
        for p in prompts:
            ids = tokenizer.encode(p, allow_special=True) if isinstance(p, str) else list(p)
            try:
                llm.validate_prompt(ids)
            except ValueError as err:
                code = "context_length_exceeded" if "context" in str(err) else "invalid_prompt"
                raise APIError(400, str(err), param="prompt", code=code) from None
            prompt_ids_list.append(ids)
        created, completion_id = now(), new_id("cmpl")
        groups = []
        for pi, ids in enumerate(prompt_ids_list):
            group = []
            for i in range(req.n):
                index = pi * req.n + i
                params = sampling_params(req, len(ids), i, req.logprobs)
                group.append(Choice(index, f"{completion_id}-{index}-{uuid.uuid4().hex[:8]}", params,
                                    TextStream(tokenizer, req.stop, hidden_ids)))
            groups.append((ids, group))
            metrics.prompt_tokens.inc(len(ids) * req.n)
        start = time.perf_counter()

        def text_logprobs(entries, start: int = 0) -> dict:
            tokens = [token_text(lp.token_id) for lp in entries]
            return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in entries],
                    "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in entries],
                    "text_offset": list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=start))
                    if tokens else []}

        updates: asyncio.Queue = asyncio.Queue()
        runners = [asyncio.create_task(run_choices(group, ids, updates)) for ids, group in groups]

        def echo_text(choice: Choice) -> str:
            for ids, group in groups:
                if choice in group:
                    return tokenizer.decode(ids)
            return ""

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def sse():
                total_prompt = sum(len(ids) for ids, _ in groups)  # once per prompt, as OpenAI and vLLM
                completion_tokens = 0
                try:
                    async for choice, out, piece, first_tokens, done in drain(updates, len(runners)):
                        if isinstance(out, Exception):
                            yield f"data: {json.dumps(APIError(500, str(out), 'server_error').body())}\n\n"
                            continue
                        if req.echo and first_tokens:
                            piece = echo_text(choice) + piece
                        reason = None
                        if done:
                            reason = choice.finish_reason = "stop" if choice.text.stopped else out.finish_reason
                            completion_tokens += out.num_output_tokens
                        if piece or reason:
                            body = {"id": completion_id, "object": "text_completion", "created": created,
                                    "model": cfg.model_name, "choices": [{
                                        "index": choice.index, "text": piece, "finish_reason": reason,
                                        "logprobs": text_logprobs(out.new_logprobs, choice.text.sent - len(piece))
                                        if req.logprobs is not None else None}]}
                            if include_usage:
                                body["usage"] = None
                            yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
                    if include_usage:
                        body = {"id": completion_id, "object": "text_completion", "created": created,
                                "model": cfg.model_name, "choices": [], "usage": usage(total_prompt, completion_tokens)}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    for r in runners:
                        r.cancel()

            return StreamingResponse(sse(), media_type="text/event-stream")

        try:
            async for choice, out, _, _, done in unless_disconnected(request, drain(updates, len(runners))):
                if isinstance(out, Exception):
                    raise APIError(500 if isinstance(out, EngineError) else 400, str(out))
                if done:
                    choice.finish_reason = "stop" if choice.text.stopped else out.finish_reason
        finally:
            for r in runners:
                r.cancel()
        result, completion_tokens = [], 0
        for ids, group in groups:
            for c in group:
                text = c.text.text
                if req.echo:
                    text = tokenizer.decode(ids) + text
                completion_tokens += len(c.tokens)
                result.append({"index": c.index, "text": text, "finish_reason": c.finish_reason,
                               "logprobs": text_logprobs(c.logprobs) if req.logprobs is not None else None})
        metrics.latency.observe(time.perf_counter() - start)
        total_prompt = sum(len(ids) for ids, _ in groups)  # once per prompt, as OpenAI and vLLM
        return {"id": completion_id, "object": "text_completion", "created": created, "model": cfg.model_name,
                "choices": sorted(result, key=lambda c: c["index"]), "usage": usage(total_prompt, completion_tokens)}

    app.state.responses_store = ResponseStore(cfg.responses_store_items, cfg.responses_store_bytes)
    app.include_router(anthropic.router())
    app.include_router(responses.router())
    return app


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's bytes_to_unicode) back to the bytes it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


BYTE_DECODER = _byte_decoder()
START_TIME = now()
KNOWN_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", *anthropic.ROUTES, *responses.ROUTES}
