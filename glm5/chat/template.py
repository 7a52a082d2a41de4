"""GLM-5's chat format as a Jinja template, and a sandboxed renderer for any `tokenizer_config.json` template.

    from glm5.chat import GLM5_CHAT_TEMPLATE, render_jinja_template
    text = render_jinja_template(GLM5_CHAT_TEMPLATE, messages, tools, enable_thinking=False)
    assert text == render_messages(messages, tools, enable_thinking=False)   # tested on 20+ conversations

The template is what `Tokenizer.save` writes into `tokenizer_config.json`, so transformers'
`apply_chat_template` and vLLM give the same prompt as `render_messages`. The renderer sets up the
environment those tools use (trim_blocks, lstrip_blocks, a `tojson` that keeps non-ASCII, `raise_exception`,
`{% generation %}` blocks) so a checkpoint's own template renders here as it does there: it is the path for
a checkpoint's own `chat_template` (`Tokenizer.chat_template`, read from its tokenizer_config.json), and
`detect_chat_format` tells a GLM-4.5/4.6-style template (a /nothink switch) from GLM-5's, which decides how
the model's output is parsed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

# Written with explicit whitespace control everywhere, so it renders the same with or without
# trim_blocks/lstrip_blocks. Keep it in step with render.py: test_chat_render compares the two.
GLM5_CHAT_TEMPLATE = r"""
{%- macro text_of(content) -%}
  {%- if content is none -%}
  {%- elif content is string -%}{{- content -}}
  {%- elif content is iterable and content is not mapping -%}
    {%- for part in content -%}
      {%- if part is string -%}{{- part -}}
      {%- elif part is mapping and part.type == 'text' -%}{{- part.text -}}
      {%- endif -%}
    {%- endfor -%}
  {%- else -%}{{- raise_exception('message content must be a string, None or a list of text parts') -}}
  {%- endif -%}
{%- endmacro -%}
{%- set clear = clear_thinking if clear_thinking is defined else true -%}
{%- set ns = namespace(last_user=-1, previous_role='') -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- '[gMASK]<sop>' -}}
{%- if tools -%}
  {{- '<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n' -}}
  {%- for tool in tools -%}{{- tool | tojson(ensure_ascii=False) -}}{{- '\n' -}}{%- endfor -%}
  {{- '</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n' -}}
  {{- '<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>' -}}
  {{- '<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>' -}}
{%- endif -%}
{%- for m in messages -%}
  {%- if m.role == 'system' or m.role == 'developer' -%}
    {{- '<|system|>' + text_of(m.content) -}}
  {%- elif m.role == 'user' -%}
    {{- '<|user|>' + text_of(m.content) -}}
  {%- elif m.role == 'tool' -%}
    {%- if ns.previous_role != 'tool' -%}{{- '<|observation|>' -}}{%- endif -%}
    {{- '<tool_response>' + text_of(m.content) + '</tool_response>' -}}
  {%- elif m.role == 'assistant' -%}
    {%- set content = text_of(m.content) -%}
    {%- if m.reasoning_content is string -%}
      {%- set reasoning = m.reasoning_content -%}
    {%- elif m.reasoning is string -%}
      {%- set reasoning = m.reasoning -%}
    {%- elif '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
      {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
    {%- else -%}
      {%- set reasoning = '' -%}
    {%- endif -%}
    {{- '<|assistant|>' -}}
    {%- if reasoning and (loop.index0 > ns.last_user or not clear) -%}
      {{- '<think>' + reasoning.strip() + '</think>' -}}
    {%- else -%}
      {{- '</think>' -}}
    {%- endif -%}
    {{- content.strip() -}}
    {%- for call in m.tool_calls or [] -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {{- '<tool_call>' + fn.name -}}
      {%- for key, value in (fn.arguments or {}).items() -%}
        {{- '<arg_key>' + key + '</arg_key><arg_value>' -}}
        {{- value if value is string else value | tojson(ensure_ascii=False) -}}
        {{- '</arg_value>' -}}
      {%- endfor -%}
      {{- '</tool_call>' -}}
    {%- endfor -%}
  {%- else -%}
    {{- raise_exception('unknown role ' ~ m.role) -}}
  {%- endif -%}
  {%- set ns.previous_role = m.role -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant|>' + ('</think>' if enable_thinking is defined and not enable_thinking else '<think>') -}}
{%- endif -%}
"""


class TemplateError(ValueError):
    """A chat template refused its input (its `raise_exception`) or could not be rendered."""


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """Accepts `{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers) and
        renders the body unchanged; render_messages_with_mask gives the mask instead."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _with_parsed_arguments(messages: Sequence[Mapping]) -> list[Mapping]:
    """Tool-call arguments as dicts: templates iterate `arguments.items()`, OpenAI clients send JSON strings."""
    from glm5.chat.render import check_messages, tool_call_function

    out = []
    for index, message in enumerate(check_messages(messages)):
        if message.get("tool_calls"):
            calls = []
            for number, call in enumerate(message["tool_calls"]):
                name, arguments = tool_call_function(call, f"messages[{index}].tool_calls[{number}]")
                calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out


def render_jinja_template(
    template: str,
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None = None,
    *,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Render a chat template (e.g. `tokenizer_config.json`'s) in a sandbox; kwargs are template variables
    such as enable_thinking, clear_thinking. Raises ValueError (TemplateError) on a template error."""
    from jinja2 import TemplateError as JinjaError

    try:
        compiled = _compile(template)
        return compiled.render(messages=_with_parsed_arguments(messages), tools=tools,
                               add_generation_prompt=add_generation_prompt, **kwargs)
    except JinjaError as err:
        raise TemplateError(f"chat template failed: {err}") from err


def detect_chat_format(template: str) -> str:
    """"glm45" for GLM-4.5/4.6 templates (newlines between parts, a /nothink switch), else "glm5"."""
    return "glm45" if "/nothink" in template else "glm5"
