"""GLM-5's chat format: render messages to a prompt, and parse the model's reasoning, content and tool calls.

    from glm5.chat import render_messages, parse_output, StreamingParser
    prompt = render_messages(messages, tools)                 # '[gMASK]<sop>...<|assistant|><think>'
    result = parse_output(model_text, tools)                 # .reasoning, .content, .tool_calls
    parser = StreamingParser(tools)                          # the same, token by token
    for piece in pieces: events = parser.feed(piece)         # ReasoningDelta, ContentDelta, ToolCall*
    events, result = parser.close(), parser.finish()

Needs no model and no torch: the server and the SFT data pipeline both build on it.
"""

from glm5.chat.parse import (
    ContentDelta,
    ParsedOutput,
    ReasoningDelta,
    StreamingParser,
    ToolCall,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
    parse_output,
)
from glm5.chat.render import render_messages, render_messages_with_mask, render_parts
from glm5.chat.template import GLM5_CHAT_TEMPLATE, TemplateError, detect_chat_format, render_jinja_template

__all__ = [
    "GLM5_CHAT_TEMPLATE",
    "ContentDelta",
    "ParsedOutput",
    "ReasoningDelta",
    "StreamingParser",
    "TemplateError",
    "ToolCall",
    "ToolCallArgumentsDelta",
    "ToolCallEnd",
    "ToolCallStart",
    "detect_chat_format",
    "parse_output",
    "render_jinja_template",
    "render_messages",
    "render_messages_with_mask",
    "render_parts",
]
