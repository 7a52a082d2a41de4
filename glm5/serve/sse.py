"""Server-sent events: how every streamed answer is framed.

    return event_stream(chunks())            # chunks() yields dicts (or already framed strings)
    sse_event({"id": ..., "choices": [...]}) # 'data: {...}\\n\\n'
    sse_event(body, event="message_start")   # 'event: message_start\\ndata: {...}\\n\\n' (Anthropic names its events)

OpenAI ends a stream with `data: [DONE]`; Anthropic with a `message_stop` event. Text is sent as UTF-8, not
\\u-escaped (ensure_ascii=False), as OpenAI does.
"""

from __future__ import annotations

import json

from fastapi.responses import StreamingResponse

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def sse_event(body: dict, event: str | None = None) -> str:
    data = f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
    return f"event: {event}\n{data}" if event else data


def event_stream(events) -> StreamingResponse:
    """A text/event-stream response over an async iterator of framed events (strings)."""
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)
