"""A real glm5 server on a free loopback port, in a thread, for the serving tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_engine(engine, tokenizer, script: list[str], prompts: list[list[int]], tokens_per_step: int = 1) -> None:
    """Make the async engine 'generate' the texts of `script` (first in, first out; one token per step) instead
    of running the model, so a test knows the output; every prompt's ids are appended to `prompts`. The server
    around it (parsing, streaming, logprobs, usage) is the real one. An empty script falls back to the model."""
    from glm5.engine.llm import StepOutput
    from glm5.engine.sequence import TokenLogprob

    model_generate = engine.generate

    async def generate(prompt_ids, params, request_id):
        prompts.append(list(prompt_ids))
        if not script:
            async for out in model_generate(prompt_ids, params, request_id):
                yield out
            return
        ids = tokenizer.encode(script.pop(0), allow_special=True)
        for k in range(0, len(ids), tokens_per_step):  # several tokens a step: as MTP speculation emits them
            await asyncio.sleep(0)
            step = ids[k : k + tokens_per_step]
            last = k + len(step) == len(ids)
            logprobs = [] if params.logprobs is None else [
                TokenLogprob(t, -0.5, [(t, -0.5)] * params.logprobs) for t in step]
            yield StepOutput(request_id, step, logprobs, last, "stop" if last else None, len(prompt_ids), k + len(step))

    engine.generate = generate


class ForcedTokens:
    """A logits processor that makes the engine write `ids` and then `end_id`: every other token gets -inf.
    A function of the output ids alone (stateless), so MTP speculation drafts and verifies through it."""

    stateless = True

    def __init__(self, ids: list[int], end_id: int) -> None:
        self.ids, self.end_id = ids, end_id

    def __call__(self, output_ids, logits):
        import torch

        n = len(output_ids)
        forced = torch.full_like(logits, float("-inf"))
        forced[self.ids[n] if n < len(self.ids) else self.end_id] = 0.0
        return forced


def force_engine(engine, tokenizer, script: list[str], prompts: list[list[int]] | None = None) -> None:
    """Make the real engine write the texts of `script` (first in, first out), each then `<|endoftext|>`: the
    model runs, the sampler (or MTP drafting and verification) picks the forced ids, and the server detokenizes
    and parses them as any output. An empty script leaves the model alone."""
    real_generate = engine.generate
    end_id = tokenizer.special_token_id("<|endoftext|>")

    def generate(prompt_ids, params, request_id):
        if prompts is not None:
            prompts.append(list(prompt_ids))
        if script:
            ids = tokenizer.encode(script.pop(0), allow_special=True)
            params.logits_processors = [*params.logits_processors, ForcedTokens(ids, end_id)]
        return real_generate(prompt_ids, params, request_id)

    engine.generate = generate


@contextlib.contextmanager
def running_server(argv: list[str], script: list[str] | None = None, prompts: list[list[int]] | None = None,
                   tokens_per_step: int = 1, forced: list[str] | None = None):
    """Start `glm5 serve <argv>` in-process (uvicorn in a thread); yield (base_url, app); shut down after.
    With `script`, the engine answers with those texts (see `script_engine`); with `forced`, the real engine is
    made to write them (see `force_engine`)."""
    import uvicorn

    from glm5.cli import build_parser
    from glm5.serve.app import create_app
    from glm5.serve.cli import build_server

    args = build_parser().parse_args(["serve", *argv])
    engine, tokenizer, config = build_server(args)
    if script is not None:
        script_engine(engine, tokenizer, script, prompts if prompts is not None else [], tokens_per_step)
    if forced is not None:
        force_engine(engine, tokenizer, forced, prompts)
    app = create_app(engine, tokenizer, config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()
