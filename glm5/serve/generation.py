"""Running a request's choices on the engine and reading their text back, for any API's route.

    choices = [Choice(i, request_id, params, ChoiceText(...) or TextStream(...)) for i in range(n)]
    async with generate(state, [(prompt_ids, choices)]) as updates:
        async for choice, out, pushed, first, done in updates:    # StepOutput per step, text already pushed
            ...
            if done: choice.finish_reason = finish_reason(choice, out.finish_reason)

`generate` starts one engine request per choice and stops them all when the block is left (a client that
disconnects, an error, a stop string): nothing keeps generating for nobody. `unless_disconnected` ends a
non-streamed request when its client goes. `finish_reason` is the one rule for why a choice ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass, field

from fastapi import Request

from glm5.engine.sequence import SamplingParams
from glm5.serve.async_engine import EngineError
from glm5.serve.errors import APIError
from glm5.serve.state import ServerState
from glm5.serve.text import ChoiceText, TextStream


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

    @property
    def stopped(self) -> bool:
        """A stop string ended the text."""
        return self.text.stopped


def finish_reason(choice: Choice, engine_reason: str | None, tool_calls: bool | None = None) -> str:
    """Why a choice ended, in OpenAI's words: "tool_calls" (it made one; `tool_calls` overrides the count the
    stream kept), "stop" (a stop string, or an end-of-turn token), "length" (max_tokens or the context).
    Other APIs map these to their own ("stop" + choice.stopped is Anthropic's stop_sequence)."""
    if choice.num_tool_calls if tool_calls is None else tool_calls:
        return "tool_calls"
    if choice.stopped:
        return "stop"
    return engine_reason or "stop"


def engine_failure(err: Exception) -> APIError:
    """An engine-side failure of a choice as an API error: 500 for a failed step, 400 for a refused request."""
    if isinstance(err, EngineError):
        return APIError(500, str(err), "server_error")
    return APIError(400, str(err))


async def _run_choices(state: ServerState, choices: list[Choice], prompt_ids: list[int],
                       updates: asyncio.Queue) -> None:
    """Drive every choice's engine request, putting (choice, StepOutput | Exception) on `updates`, then None.
    A consumer that ends a choice early (a stop string) cancels `choice.task`, which aborts the request."""

    async def one(choice: Choice):
        try:
            async for out in state.engine.generate(prompt_ids, choice.params, choice.request_id):
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


async def _drain(updates: asyncio.Queue, runners: int):
    """The engine's updates applied to their choices until all `runners` are done.

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


@contextlib.asynccontextmanager
async def generate(state: ServerState, groups: list[tuple[list[int], list[Choice]]]):
    """Start every choice of every (prompt ids, choices) group on the engine; yield the stream of their updates
    (see _drain); on leaving, abort whatever is still running. Counts the prompt tokens served."""
    updates: asyncio.Queue = asyncio.Queue()
    runners = []
    for ids, choices in groups:
        state.metrics.prompt_tokens.inc(len(ids) * len(choices))
        runners.append(asyncio.create_task(_run_choices(state, choices, ids, updates)))
    try:
        yield _drain(updates, len(runners))
    finally:
        for r in runners:
            r.cancel()


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
