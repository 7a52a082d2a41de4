"""POST /v1/completions: OpenAI's (legacy) text completions, streamed or not.

    curl localhost:8000/v1/completions -d '{"model": "nano", "prompt": "def add(a, b):", "max_tokens": 16}'

`prompt` is a string, a list of strings, a list of token ids or a list of those; n choices per prompt, indexed
prompt-major as OpenAI does. `echo` prepends the prompt's text; logprobs give tokens, top_logprobs and
`text_offset`. `suffix`, and echo with logprobs, are refused (400).
"""

from __future__ import annotations

import itertools
import time
import uuid

from fastapi import APIRouter, Request

from glm5.serve.generation import Choice, engine_failure, finish_reason, generate, unless_disconnected
from glm5.serve.inputs import check_prompt, parse_request, prompt_ids, read_json, sampling_params
from glm5.serve.protocol import CompletionRequest, new_id, now, usage
from glm5.serve.sse import DONE, event_stream, sse_event
from glm5.serve.state import ServerState, server_state
from glm5.serve.text import TextStream

router = APIRouter()
PATHS = ("/v1/completions",)


def text_logprobs(state: ServerState, entries, start: int = 0) -> dict:
    tokens = [state.token_text(lp.token_id) for lp in entries]
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [{state.token_text(t): v for t, v in lp.top} for lp in entries],
            "text_offset": list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=start)) if tokens else []}


@router.post("/v1/completions")
async def completions(request: Request):
    state = server_state(request)
    req: CompletionRequest = parse_request(CompletionRequest, await read_json(request, state), state)
    tokenizer, cfg = state.tokenizer, state.config
    prompts = req.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    groups: list[tuple[list[int], list[Choice]]] = []
    created, completion_id = now(), new_id("cmpl")
    for pi, p in enumerate(prompts):
        if isinstance(p, str):
            ids = await prompt_ids(state, p, param="prompt")
        else:
            ids = list(p)
            check_prompt(state, ids, param="prompt")
        group = []
        for i in range(req.n):
            index = pi * req.n + i
            params = sampling_params(state, req, len(ids), i, req.logprobs)
            group.append(Choice(index, f"{completion_id}-{index}-{uuid.uuid4().hex[:8]}", params,
                                TextStream(tokenizer, req.stop, state.hidden_ids)))
        groups.append((ids, group))
    prompt_of = {id(c): ids for ids, group in groups for c in group}
    total_prompt = sum(len(ids) for ids, _ in groups)  # once per prompt, as OpenAI and vLLM
    start = time.perf_counter()

    def body(choices: list[dict], usage_value=None, with_usage: bool = False) -> dict:
        out = {"id": completion_id, "object": "text_completion", "created": created, "model": cfg.model_name,
               "choices": choices}
        if with_usage:
            out["usage"] = usage_value
        return out

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            completion_tokens = 0
            async with generate(state, groups) as updates:
                async for choice, out, piece, first_tokens, done in updates:
                    if isinstance(out, Exception):
                        yield sse_event(engine_failure(out).body())
                        continue
                    if req.echo and first_tokens:
                        piece = tokenizer.decode(prompt_of[id(choice)]) + piece
                    reason = None
                    if done:
                        reason = choice.finish_reason = finish_reason(choice, out.finish_reason)
                        completion_tokens += out.num_output_tokens
                    if piece or reason:
                        lp = (text_logprobs(state, out.new_logprobs, choice.text.sent - len(piece))
                              if req.logprobs is not None else None)
                        yield sse_event(body([{"index": choice.index, "text": piece, "finish_reason": reason,
                                               "logprobs": lp}], None, include_usage))
            if include_usage:
                yield sse_event(body([], usage(total_prompt, completion_tokens), True))
            yield DONE
            state.metrics.latency.observe(time.perf_counter() - start)

        return event_stream(events())

    async with generate(state, groups) as updates:
        async for choice, out, _, _, done in unless_disconnected(request, updates):
            if isinstance(out, Exception):
                raise engine_failure(out)
            if done:
                choice.finish_reason = finish_reason(choice, out.finish_reason)
    result, completion_tokens = [], 0
    for ids, group in groups:
        for c in group:
            text = c.text.text
            if req.echo:
                text = tokenizer.decode(ids) + text
            completion_tokens += len(c.tokens)
            result.append({"index": c.index, "text": text, "finish_reason": c.finish_reason,
                           "logprobs": text_logprobs(state, c.logprobs) if req.logprobs is not None else None})
    state.metrics.latency.observe(time.perf_counter() - start)
    return body(sorted(result, key=lambda c: c["index"]), usage(total_prompt, completion_tokens), True)
