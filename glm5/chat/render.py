"""OpenAI-style messages -> GLM-5's prompt text, and the token ids plus SFT loss mask of a conversation.

    from glm5.chat import render_messages, render_messages_with_mask
    prompt = render_messages([{"role": "user", "content": "hi"}])
    # '[gMASK]<sop><|user|>hi<|assistant|><think>'
    ids, mask = render_messages_with_mask(conversation, tokenizer)   # mask[i]: token i is a loss target

The format (GLM-4.7 / GLM-5; no newlines between parts):
    [gMASK]<sop>
    <|system|>  tools block (only with tools)
    <|system|>{system}  <|user|>{user}
    <|assistant|><think>{reasoning}</think>{content}<tool_call>{name}<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>
    <|observation|><tool_response>{result}</tool_response><tool_response>...   (one <|observation|> per run)
    <|assistant|><think>          the generation prompt (`</think>` instead with enable_thinking=False)
Reasoning is kept only for assistant turns after the last user message (the tool-calling loop of the
current request); earlier turns get a lone `</think>`, unless clear_thinking=False keeps them all.

Every assistant message may carry its reasoning as `reasoning_content` (GLM, SGLang) or `reasoning`
(newer vLLM), or inline as `<think>...</think>` at the start of `content`. Tool-call arguments may be a
dict or an OpenAI JSON string. Content may be a string, None, or a list of {"type": "text"} parts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

PREFIX = "[gMASK]<sop>"
TOOLS_HEADER = (
    "\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML "
    "format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
    "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>"
)
ROLES = ("system", "developer", "user", "assistant", "tool")


# ---- normalising input ------------------------------------------------------------------------------
def visible_text(content: Any, where: str = "content") -> str:
    """A message's text: a string as is, None as "", a list of parts as its text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        pieces = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                pieces.append(str(part.get("text", "")))
            # other parts (images, audio) have no text form in a text-only model: dropped
        return "".join(pieces)
    raise ValueError(f"{where} must be a string, None or a list of text parts, got {type(content).__name__}")


def tool_call_function(call: Any, where: str) -> tuple[str, dict]:
    """(name, arguments as a dict) of one tool call, OpenAI envelope or bare {"name", "arguments"}."""
    if not isinstance(call, Mapping):
        raise ValueError(f"{where} must be an object, got {type(call).__name__}")
    function = call.get("function", call)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where} needs a function name")
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}.arguments is not valid JSON: {err}") from None
    if not isinstance(arguments, Mapping):
        raise ValueError(f"{where}.arguments must be a JSON object, got {type(arguments).__name__}")
    return function["name"], dict(arguments)


def split_reasoning(message: Mapping, index: int) -> tuple[str, str]:
    """(reasoning, content) of an assistant message; reasoning not yet stripped (its truth value matters)."""
    content = visible_text(message.get("content"), f"messages[{index}].content")
    for key in ("reasoning_content", "reasoning"):
        if isinstance(message.get(key), str):
            return message[key], content
    if "</think>" in content:  # reasoning inline in the content, as a raw model output would have it
        before, _, _ = content.partition("</think>")
        reasoning = before.rstrip("\n").split("<think>")[-1].lstrip("\n")
        return reasoning, content.split("</think>")[-1].lstrip("\n")
    return "", content


def format_argument(value: Any) -> str:
    """Strings go in raw; everything else as JSON (non-ASCII kept), as the model is taught to write them."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def check_messages(messages: Any) -> list[Mapping]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of message objects, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{index}] has unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return list(messages)


# ---- rendering --------------------------------------------------------------------------------------
def render_parts(
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None = None,
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
    clear_thinking: bool = True,
) -> list[tuple[str, bool]]:
    """The prompt as (text, is_assistant_target) pieces; `render_messages` joins them.

    Every switch between target and not-target falls next to a special token, so encoding the pieces
    one by one gives the same ids as encoding the joined text.
    """
    messages = check_messages(messages)
    parts: list[tuple[str, bool]] = [(PREFIX, False)]
    if tools:
        if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
            raise ValueError(f"tools must be a list of tool objects, got {type(tools).__name__}")
        listing = "".join(json.dumps(tool, ensure_ascii=False) + "\n" for tool in tools)
        parts.append(("<|system|>" + TOOLS_HEADER + listing + TOOLS_FOOTER, False))

    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    previous_role = None
    for index, message in enumerate(messages):
        role = message["role"]
        # the token that opens this message ends a preceding assistant turn: the model must learn to emit it
        ends_assistant_turn = previous_role == "assistant"
        if role in ("system", "developer"):
            parts.append(("<|system|>", False))
            parts.append((visible_text(message.get("content"), f"messages[{index}].content"), False))
        elif role == "user":
            parts.append(("<|user|>", ends_assistant_turn))
            parts.append((visible_text(message.get("content"), f"messages[{index}].content"), False))
        elif role == "tool":
            if previous_role != "tool":
                parts.append(("<|observation|>", ends_assistant_turn))
            result = visible_text(message.get("content"), f"messages[{index}].content")
            parts.append(("<tool_response>" + result + "</tool_response>", False))
        else:  # assistant
            reasoning, content = split_reasoning(message, index)
            parts.append(("<|assistant|>", False))
            if reasoning and (index > last_user or not clear_thinking):
                parts.append(("<think>", False))
                turn = [reasoning.strip() + "</think>"]
            else:
                turn = ["</think>"]
            turn.append(content.strip())
            for number, call in enumerate(message.get("tool_calls") or []):
                name, arguments = tool_call_function(call, f"messages[{index}].tool_calls[{number}]")
                turn.append("<tool_call>" + name)
                for key, value in arguments.items():
                    turn.append(f"<arg_key>{key}</arg_key><arg_value>{format_argument(value)}</arg_value>")
                turn.append("</tool_call>")
            parts.append(("".join(turn), True))
        previous_role = role
    if add_generation_prompt:
        parts.append(("<|assistant|>", False))
        parts.append(("<think>" if enable_thinking else "</think>", False))
    return parts


def render_messages(
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None = None,
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
    clear_thinking: bool = True,
) -> str:
    """GLM-5's prompt text for OpenAI-style `messages` (and `tools`, as passed in the request)."""
    parts = render_parts(messages, tools, add_generation_prompt=add_generation_prompt,
                         enable_thinking=enable_thinking, clear_thinking=clear_thinking)
    return "".join(text for text, _ in parts)


def render_messages_with_mask(
    messages: Sequence[Mapping],
    tokenizer,
    tools: Sequence[Mapping] | None = None,
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
    clear_thinking: bool = True,
    eos_at_end: bool = True,
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per id, whether it is an assistant target (SFT loss).

    Targets: everything an assistant turn writes after `<|assistant|>` (and after the opening `<think>`
    when reasoning is kept): reasoning, `</think>`, content, tool calls; plus the `<|user|>` or
    `<|observation|>` that ends the turn, since emitting it is how the model stops. When the
    conversation ends on an assistant turn, `<|endoftext|>` is appended as its stop target
    (eos_at_end=False leaves it out). Without it, ids == tokenizer.encode(render_messages(...), allow_special=True).

    With clear_thinking=True, earlier turns lose their reasoning yet stay targets; to train only on
    turns that kept their reasoning, render each turn as its own sample.
    """
    parts = render_parts(messages, tools, add_generation_prompt=add_generation_prompt,
                         enable_thinking=enable_thinking, clear_thinking=clear_thinking)
    if eos_at_end and not add_generation_prompt and messages and messages[-1]["role"] == "assistant":
        parts.append(("<|endoftext|>", True))
    # merge neighbours with the same flag: fewer, longer encode calls
    merged: list[tuple[str, bool]] = []
    for text, target in parts:
        if merged and merged[-1][1] == target:
            merged[-1] = (merged[-1][0] + text, target)
        elif text:
            merged.append((text, target))
    ids: list[int] = []
    mask: list[bool] = []
    for piece_ids, (_, target) in zip(tokenizer.encode_batch([t for t, _ in merged], allow_special=True), merged):
        ids.extend(piece_ids)
        mask.extend([target] * len(piece_ids))
    return ids, mask


# the name the SFT code may look for
render_with_mask = render_messages_with_mask
