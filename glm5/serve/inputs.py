"""From a request to what the engine takes: the JSON body, the validated request, the prompt's ids, SamplingParams.

Every API's routes go through the same four steps (openai_chat.py, openai_completions.py, and any new API):

    body = await read_json(request, state)                       # size-capped, valid UTF-8, no lone surrogates
    req = parse_request(ChatCompletionRequest, body, state)      # pydantic -> 400 naming the field; model name
    text = render_chat(state, messages, tools, enable_thinking=True, clear_thinking=True)  # the served template
    ids = await prompt_ids(state, prompt_text, param="messages") # length bound first, tokenized off the loop
    params = sampling_params(state, req, len(ids), index=i)      # request fields -> SamplingParams (or a 400)

A lone UTF-16 surrogate ("\\ud800" in the JSON) is valid JSON but no valid text: it is refused with a 400 here,
before a tokenizer or a response encoder meets it. A prompt is checked against the context in bytes before it is
tokenized (a prompt of B bytes has at least B / max_token_bytes tokens), and a long one is tokenized on a worker
thread, so a few 4 MB prompts do not stall /health or the other streams.
"""

from __future__ import annotations

import asyncio
import json
import re

from fastapi import Request
from pydantic import ValidationError

from glm5.chat import render_messages
from glm5.chat.template import render_jinja_template
from glm5.engine.sequence import SamplingParams
from glm5.serve.errors import APIError, validation_error
from glm5.serve.json_mode import LogitBias
from glm5.serve.state import ServerState

# a surrogate as a JSON escape, or as raw UTF-8-style bytes (json.loads decodes bytes with surrogatepass): only
# bodies with one are walked for lone surrogates
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
OFF_LOOP_BYTES = 16 << 10  # prompts longer than this are tokenized on a worker thread


async def read_json(request: Request, state: ServerState) -> dict:
    """The body as a JSON object; 413 over the size cap (counted as it streams in), 400 if not JSON or not text."""
    limit = state.config.max_body_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body over {limit} bytes", code="too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    if _SURROGATE.search(raw):
        where = lone_surrogate_path(body)
        if where is not None:
            raise APIError(400, f"{where or 'the body'}: a lone UTF-16 surrogate (e.g. \\ud800) is not valid text",
                           param=where or None, code="invalid_unicode")
    return body


def lone_surrogate_path(value, path: str = "") -> str | None:
    """The dotted path of the first string (or key) holding a lone surrogate, '' for the root, None if none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if lone_surrogate_path(key) is not None:
                return path or ""
            found = lone_surrogate_path(item, sub)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate_path(item, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


def render_chat(state: ServerState, messages, tools, *, enable_thinking: bool, clear_thinking: bool = True,
                status: int = 422) -> str:
    """The prompt text of a conversation: the served chat template (the checkpoint's or --chat-template) when
    there is one, else GLM-5's format (glm5.chat.render_messages). Messages that cannot be rendered are a 422
    (`status`: Anthropic's API answers them 400)."""
    try:
        if state.config.chat_template is not None:
            return render_jinja_template(state.config.chat_template, messages, tools, enable_thinking=enable_thinking,
                                         clear_thinking=clear_thinking)
        return render_messages(messages, tools, enable_thinking=enable_thinking, clear_thinking=clear_thinking)
    except (ValueError, TypeError, KeyError) as err:
        raise APIError(status, f"messages cannot be rendered: {err}", param="messages", code="invalid_messages") from None


def parse_request(model_cls, body: dict, state: ServerState):
    """The pydantic request (400 naming the first bad field); 404 for a model this server does not serve."""
    try:
        req = model_cls.model_validate(body)
    except ValidationError as err:
        raise validation_error(err) from None
    name = state.config.model_name
    if req.model != name:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves {name!r}",
                       "not_found_error", "model", "model_not_found")
    return req


async def prompt_ids(state: ServerState, text: str, param: str) -> list[int]:
    """The prompt's token ids (specials in it allowed: it is rendered by the server or given as raw text),
    checked against the context; `param` names the request field a 400 points at."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise APIError(400, f"{param}: a lone UTF-16 surrogate is not valid text", param=param,
                       code="invalid_unicode") from None
    limit = state.max_prompt_tokens
    if size > limit * state.max_token_bytes:  # certainly more than `limit` tokens: no need to count them
        raise APIError(400, f"the prompt has {size} bytes, over {limit} tokens of at most {state.max_token_bytes} "
                            f"bytes each; this model's context allows at most {limit} prompt tokens", param=param,
                       code="context_length_exceeded")
    tokenizer = state.tokenizer
    if size > OFF_LOOP_BYTES and hasattr(tokenizer, "encode_batch"):
        # on a worker thread, through encode_batch: the Rust tokenizer releases the GIL there (its single
        # encode holds it, which would stall the event loop just the same from another thread)
        ids = (await asyncio.to_thread(tokenizer.encode_batch, [text], allow_special=True))[0]
    else:
        ids = tokenizer.encode(text, allow_special=True)
    check_prompt(state, ids, param)
    return ids


def check_prompt(state: ServerState, ids: list[int], param: str) -> None:
    """The engine's own check (ids in the vocabulary, shorter than the context) as a 400 naming `param`."""
    try:
        state.llm.validate_prompt(ids)
    except ValueError as err:
        code = "context_length_exceeded" if "context" in str(err) else "invalid_prompt"
        raise APIError(400, str(err), param=param, code=code) from None


def sampling_params(state: ServerState, req, prompt_len: int, index: int = 0, logprobs: int | None = None,
                    processors=None) -> SamplingParams:
    """One choice's SamplingParams from any API's request: fields named as SamplingParams names them are read
    when the request has them (`max_new_tokens`, `temperature`, `top_p`, `top_k`, `min_p`, the penalties,
    `seed`, `ignore_eos`, `logit_bias`), the rest keep the engine's defaults. Choice `index` of n gets seed + index.
    A max_tokens that does not fit the context, or a value the engine refuses, is a 400."""
    llm = state.llm
    room = llm.max_model_len - prompt_len
    max_tokens = getattr(req, "max_new_tokens", None)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"this model's maximum context length is {llm.max_model_len} tokens; the prompt has "
                            f"{prompt_len} and {max_tokens} more were requested", param="max_tokens",
                       code="context_length_exceeded")
    seed = getattr(req, "seed", None)
    seed = None if seed is None else (seed + index) % (2**63)
    processors = list(processors or [])
    logit_bias = getattr(req, "logit_bias", None)
    if logit_bias:
        vocab = llm.config.vocab_size
        if any(not 0 <= t < vocab for t in logit_bias):
            raise APIError(400, f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        processors.append(LogitBias(logit_bias))
    fields = {name: value for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                       "frequency_penalty", "repetition_penalty", "ignore_eos")
              if (value := getattr(req, name, None)) is not None}
    try:
        return SamplingParams(max_tokens=max_tokens or max(1, min(state.config.default_max_tokens, room)), seed=seed,
                              logprobs=logprobs, logits_processors=processors,
                              **fields)
    except ValueError as err:
        raise APIError(400, str(err)) from None


def forced_opening(tools: list[dict] | None, tool_choice, tokenizer) -> tuple[str, dict | None]:
    """tool_choice "required" or a named tool (a NamedToolChoice or the name itself): the text the assistant turn
    is made to open with, and for "required" with several tools the name -> closing tag id table that
    ToolNameProcessor holds the name to. ("", None) for "auto" / "none" / no tools."""
    if not tools or tool_choice in ("auto", "none", None):
        return "", None
    forced_name = getattr(getattr(tool_choice, "function", None), "name", None)
    if forced_name is None and tool_choice != "required":
        forced_name = tool_choice  # a tool's name, as the Anthropic and Responses routes pass it
    elif tool_choice == "required" and len(tools) == 1:
        forced_name = tools[0]["function"]["name"]
    if forced_name is not None:
        # the name is complete once the first argument key (or the end of the call) follows it
        schema = next(t["function"].get("parameters") or {} for t in tools if t["function"]["name"] == forced_name)
        return f"<tool_call>{forced_name}" + ("<arg_key>" if schema.get("properties") else "</tool_call>"), None
    # "required" with several tools: the model picks the name, held to one of them
    return "<tool_call>", {t["function"]["name"]: tokenizer.special_token_id(
        "<arg_key>" if (t["function"].get("parameters") or {}).get("properties") else "</tool_call>")
        for t in tools}
