"""The engine on its own thread, for an asyncio server: requests in, per-request token streams out.

    engine = AsyncEngine(LLMEngine(model)); engine.start()
    async for out in engine.generate(prompt_ids, params, request_id):   # StepOutput per step
        ...
Leaving the loop early (a client that disconnects, a stop string) aborts the request, which frees its
cache blocks at the next step. The engine object is only touched by the engine thread; other threads talk
to it through a command queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

import torch

from glm5.engine.llm import LLMEngine, StepOutput
from glm5.engine.sequence import SamplingParams

log = logging.getLogger("glm5.serve")


class EngineError(RuntimeError):
    """The engine failed while running a step (the request is ended; the server keeps serving)."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, num_threads: int | None = None) -> None:
        self.engine = engine
        self.num_threads = num_threads
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="glm5-engine", daemon=True)
        self.step_seconds = 0.0  # of the last step
        self.on_step = None  # callback(outputs, seconds) for metrics, called on the engine thread

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str):
        """Yield the request's StepOutputs until it finishes; abort it if the consumer stops early."""
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        self._commands.put(("add", request_id, prompt_token_ids, params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # ------------------------------------------------------------------ the engine thread
    def _emit(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, stream = entry
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # the loop is closed (server shutting down)
                pass

    def _drain(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, ids, params = command
                if request_id not in self._streams:
                    continue  # the client left before the request started
                try:
                    self.engine.add_request(ids, params, request_id)
                except ValueError as err:
                    self._emit(request_id, err)
            else:
                self.engine.abort(command[1])

    def _run(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        while not self._stopping:
            self._drain()
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            start = time.perf_counter()
            try:
                outputs: list[StepOutput] = self.engine.step()
            except Exception as err:  # a bug must not take the server down: end every request, keep going
                log.exception("engine step failed")
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._emit(request_id, EngineError(f"engine error: {type(err).__name__}"))
                continue
            self.step_seconds = time.perf_counter() - start
            for out in outputs:
                self._emit(out.request_id, out)
            if self.on_step is not None:
                self.on_step(outputs, self.step_seconds)
