"""A scripted OpenAI-compatible endpoint: replays known assistant turns, so the agent loop, the tools, the
sandbox and the harness run end to end without a model (the tests' endpoint, and a way to check that a
suite's reference solutions pass its own verifiers).

    with ScriptedEndpoint({"What is 2+2?": [{"content": "@answer[4]"}]}) as endpoint:
        client = ChatClient(endpoint.base_url)
        ...
    endpoint.requests          # every request body it received (to check what the loop sent)

A real HTTP server (FastAPI + uvicorn in a thread, free loopback port) speaking `/v1/chat/completions`
(non-streamed and streamed), `/v1/models` and `/health`. The script is chosen by the request's first user
message; the turn is the number of assistant messages already in the history (so every run of a task,
resumed or not, replays the same turns). A turn:

    {"reasoning": "...", "content": "...",
     "tool_calls": [{"name": "sql", "arguments": {"query": "..."}}],   # arguments: an object, or a raw string
     "delay_s": 2.0,                                                    # sleep first (timeouts, kills)
     "status": 500}                                                      # answer with an OpenAI error instead

Past the script's end it answers "I have nothing more to do." `sabotage(reference, kind)` turns a known-good
script into one that fails in a chosen way (one per failure class).
"""


import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from glm5.agent.loop import ABSTAIN_MARKER

END_TURN = {"content": "I have nothing more to do."}

SABOTAGE_KINDS = ("malformed_call", "unknown_tool", "bad_arguments", "tool_error_unrecovered", "step_limit",
                  "wrong_answer", "fabricated", "wrong_abstention", "timeout", "endpoint_error")


def sabotage(reference: list[dict], kind: str, *, failing_call: dict | None = None, delay_s: float = 5.0) -> list[dict]:
    """A script that fails as `kind` from a known-good one.

    malformed_call: the first call's arguments are cut JSON, then tool-call syntax in plain text, then a wrong
    answer. unknown_tool / bad_arguments: one such call, then a wrong final answer. tool_error_unrecovered:
    `failing_call` (a call its tool fails on), then a wrong answer. step_limit: the first good turn with tool
    calls repeated forever. wrong_answer: the good calls, then a wrong answer. fabricated: a confident answer
    with no lookup. wrong_abstention: declines. timeout: the first turn after `delay_s`. endpoint_error: HTTP 500.
    """
    calls = [t for t in reference if t.get("tool_calls")]
    wrong = {"content": "The answer is @answer[-1] @value[-1]; the report is done. It is Zanzibar."}
    if kind == "malformed_call":
        first = calls[0]["tool_calls"][0] if calls else {"name": "read_file"}
        return [{"tool_calls": [{"name": first["name"], "arguments": '{"query": "select'}]},
                {"content": "<tool_call>read_file<arg_key>path</arg_key>"}, wrong]
    if kind == "unknown_tool":
        return [{"tool_calls": [{"name": "no_such_tool", "arguments": {}}]}, wrong]
    if kind == "bad_arguments":
        first = calls[0]["tool_calls"][0] if calls else {"name": "read_file"}
        return [{"tool_calls": [{"name": first["name"], "arguments": {"no_such_argument": 1}}]}, wrong]
    if kind == "tool_error_unrecovered":
        if failing_call is None:
            raise ValueError("tool_error_unrecovered needs failing_call: a call its tool fails on")
        return [{"tool_calls": [failing_call]}, wrong]
    if kind == "step_limit":
        turn = calls[0] if calls else {"tool_calls": [{"name": "list_files", "arguments": {}}]}
        return [turn] * 1000
    if kind == "wrong_answer":
        return calls + [wrong]
    if kind == "fabricated":
        return [{"content": "It is certainly 42 (@answer[42]) — the records say so."}]
    if kind == "wrong_abstention":
        return [{"content": f"{ABSTAIN_MARKER} I could not find this."}]
    if kind == "timeout":
        return [{**(reference[0] if reference else END_TURN), "delay_s": delay_s}]
    if kind == "endpoint_error":
        return [{"status": 500}]
    raise ValueError(f"unknown sabotage kind {kind!r}; one of {', '.join(SABOTAGE_KINDS)}")


def _first_user(messages: list[dict]) -> str:
    return next((str(m.get("content") or "") for m in messages if m.get("role") == "user"), "")


class ScriptedEndpoint:
    def __init__(self, scripts: dict[str, list[dict]] | None = None,
                 policy: Callable[[dict], dict] | None = None, model: str = "scripted"):
        """`scripts`: first user message -> turns; `policy(request) -> turn` decides instead when given."""
        self.scripts = dict(scripts or {})
        self.policy = policy
        self.model = model
        self.requests: list[dict] = []
        self._server = None
        self._thread = None
        self.base_url = ""

    # ---- what to answer ----------------------------------------------------------------------------------
    def turn_for(self, body: dict) -> dict:
        if self.policy is not None:
            return self.policy(body)
        messages = body.get("messages") or []
        script = self.scripts.get(_first_user(messages))
        if script is None:
            return {"content": "No script for this task."}
        index = sum(m.get("role") == "assistant" for m in messages)
        return script[index] if index < len(script) else END_TURN

    def completion(self, turn: dict, step: int) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": turn.get("content", "")}
        if turn.get("reasoning"):
            message["reasoning_content"] = message["reasoning"] = turn["reasoning"]
        calls = []
        for k, call in enumerate(turn.get("tool_calls") or []):
            arguments = call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments)
            calls.append({"id": f"call_{step}_{k}", "type": "function",
                          "function": {"name": call.get("name", ""), "arguments": arguments}})
        if calls:
            message["tool_calls"] = calls
        text = json.dumps(message)
        return {"id": f"chatcmpl-{step}", "object": "chat.completion", "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
                "usage": {"prompt_tokens": 100 + 10 * step, "completion_tokens": max(1, len(text) // 4),
                          "total_tokens": 100 + 10 * step + max(1, len(text) // 4)}}

    # ---- the server --------------------------------------------------------------------------------------
    def app(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse

        app = FastAPI()

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "glm5"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            turn = self.turn_for(body)
            if turn.get("delay_s"):
                await asyncio.sleep(float(turn["delay_s"]))
            if turn.get("status"):
                return JSONResponse({"error": {"message": "scripted failure", "type": "server_error", "param": None,
                                               "code": None}}, status_code=int(turn["status"]))
            step = sum(m.get("role") == "assistant" for m in body.get("messages") or [])
            done = self.completion(turn, step)
            if not body.get("stream"):
                return done

            async def events():  # one delta per part, as a streaming server sends them
                message, choice = done["choices"][0]["message"], done["choices"][0]
                base = {k: done[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
                deltas = [{"role": "assistant"}]
                if message.get("reasoning_content"):
                    deltas.append({"reasoning_content": message["reasoning_content"]})
                if message.get("content"):
                    deltas.append({"content": message["content"]})
                for k, call in enumerate(message.get("tool_calls") or []):
                    deltas.append({"tool_calls": [{"index": k, **call}]})
                for delta in deltas:
                    yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': None}]})}\n\n"
                last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}],
                        "usage": done["usage"]}
                yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        return app

    def start(self) -> str:
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=port, log_level="error", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise OSError("the scripted endpoint did not start")
            time.sleep(0.02)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve a suite's reference scripts on a port (for manual runs and the resume test):
    python -m glm5.agent.scripted SUITE_DIR_OR_NAME PORT_FILE [--sabotage KIND] [--delay-step N --delay-s S]"""
    import argparse
    from pathlib import Path

    from glm5.agent.eval.tasks import load_suite

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("suite", help="suite name or folder whose tasks' references are replayed")
    parser.add_argument("port_file", help="file the base URL is written to once the server is up")
    parser.add_argument("--sabotage", default=None, choices=SABOTAGE_KINDS, help="replay a failing script instead")
    args = parser.parse_args(argv)
    suite = load_suite(args.suite)
    scripts = {t.prompt: (sabotage(t.reference, args.sabotage) if args.sabotage else t.reference) for t in suite.tasks}
    with ScriptedEndpoint(scripts) as endpoint:
        Path(args.port_file).write_text(endpoint.base_url)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
