"""`DIR/trace.jsonl`: one JSON event per line, appended and flushed as it happens, so a killed run leaves
everything up to its last event, and `glm5 agent run --resume DIR` rebuilds the conversation from it.

Events (each has `type`, `time` (Unix seconds) and the fields below):
    start        task, mode, model, base_url, max_steps, tools (names), files, message (system), user (task message)
    model_call   step, seconds, prompt_tokens, completion_tokens, finish_reason, compacted, message (assistant)
    tool_call    step, id, name, arguments (the raw string the model sent)
    tool_result  step, id, name, ok, seconds, files, message (the tool message the model sees)
    error        step, kind (malformed_call, unknown_tool, bad_arguments, tool_error, model_error, step_limit,
                 timeout), message; an error the model is told of also has a `message` event (tool result or
                 feedback) right after it
    feedback     step, message (a user message the loop adds, e.g. "your tool call was malformed")
    final        status (answered, abstained, step_limit, timeout, model_error, calls), answer, abstained,
                 steps, prompt_tokens, completion_tokens, seconds
    resume       (a continued run starts here)

The conversation is the `message` of start (system, then user), model_call, tool_result and feedback events,
in order. A line cut short by a kill is ignored on reading.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

MESSAGE_EVENTS = ("model_call", "tool_result", "feedback")


class Trace:
    """Append-only event log; every event is written and flushed (and fsynced) before the loop goes on."""

    def __init__(self, path: Path, on_event=None):
        self.path = Path(path)
        self.on_event = on_event  # called with each event after it is written (progress display)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:  # a kill mid-line leaves a partial line: end it so appends stay parseable
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
            if last != b"\n":
                with open(self.path, "ab") as f:
                    f.write(b"\n")
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, type: str, **fields) -> dict:
        event = {"type": type, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(event, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.on_event is not None:
            self.on_event(event)
        return event

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_trace(path: Path) -> list[dict]:
    """The events of a trace; lines that do not parse (a write cut short by a kill) are skipped."""
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and "type" in event:
                events.append(event)
    return events


def conversation(events: list[dict]) -> list[dict]:
    """The messages of the run so far, as the model saw them (without context compaction)."""
    messages: list[dict] = []
    for event in events:
        if event["type"] == "start":
            messages = [event["message"], event["user"]]
        elif event["type"] in MESSAGE_EVENTS and "message" in event:
            messages.append(event["message"])
    return messages


def pending_tool_calls(messages: list[dict]) -> list[dict]:
    """Tool calls of the last assistant message that have no tool result yet (a kill while tools ran)."""
    for k in range(len(messages) - 1, -1, -1):
        if messages[k].get("role") == "assistant":
            answered = {m.get("tool_call_id") for m in messages[k + 1:] if m.get("role") == "tool"}
            return [c for c in messages[k].get("tool_calls") or [] if c.get("id") not in answered]
    return []
