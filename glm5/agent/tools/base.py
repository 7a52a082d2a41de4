"""What a tool is: a typed JSON-schema function the model calls, and the context every call gets.

A tool has a `name`, a `description` the model reads, `parameters` (a JSON schema of an object) and the
agent `modes` it belongs to. Calling it with `(arguments, ctx)` returns a `ToolResult`; arguments that do
not fit the schema raise `ToolArgumentError` (the loop counts that as `bad_arguments`), and a tool that ran
and failed returns `ToolResult(ok=False)` (counted as `tool_error`).

    from glm5.agent.tools import tools_for_mode
    from glm5.agent.tools.base import ToolContext, openai_tool_schema
    ctx = ToolContext(workdir=Path("run"), files=[], docs_dir=None)
    tools = {t.name: t for t in tools_for_mode("data", ctx)}
    schemas = [openai_tool_schema(t) for t in tools.values()]     # the `tools` field of a chat request
    result = tools["sql"]({"query": "select count(*) from sales"}, ctx)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("auto", "data", "write", "code", "research")   # auto = every tool
MAX_CONTENT_CHARS = 20_000                               # what one tool result may put in the model's context


@dataclass
class ToolContext:
    """What every tool call gets: where it works and the limits it runs under."""

    workdir: Path                 # the run's working directory; deliverables go to workdir / "outputs"
    files: list[Path]             # the user's input files (copied into workdir/inputs by the loop)
    docs_dir: Path | None         # local document folder for search/open
    timeout_s: float = 30.0
    memory_mb: int = 1024
    unsafe_no_sandbox: bool = False

    @property
    def outputs(self) -> Path:
        return self.workdir / "outputs"


@dataclass
class ToolResult:
    content: str                                         # the text the model sees (bounded in size)
    ok: bool = True                                      # False: ran and failed -> "tool_error"
    files: list[str] = field(default_factory=list)       # paths relative to workdir made or changed
    data: dict = field(default_factory=dict)             # structured extras (citations, exit code, rows ...)


class ToolArgumentError(ValueError):
    """The arguments do not fit the tool's schema (or name a path outside the workdir): `bad_arguments`."""


class Tool:
    """Base class: subclasses set the four attributes and implement `run(arguments, ctx)`.

    `__call__` validates the arguments against `parameters` first (filling schema defaults), so `run` gets
    a clean dict.
    """

    name: str = ""
    description: str = ""
    parameters: dict = {"type": "object", "properties": {}}
    modes: frozenset[str] = frozenset(MODES)

    def __call__(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        arguments = validate_arguments(self, arguments)
        try:
            return self.run(arguments, ctx)
        except ToolArgumentError:
            raise
        except Exception as e:   # the tool ran and failed: the model reads why and may try another way
            message = str(e).strip().splitlines()[0][:500] if str(e).strip() else ""
            return ToolResult(f"{self.name} failed: {type(e).__name__}{': ' + message if message else ''}",
                              ok=False, data={"exception": type(e).__name__})

    def run(self, arguments: dict, ctx: ToolContext) -> ToolResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Tool {self.name}>"


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list, tuple),
    "object": (dict,),
    "null": (type(None),),
}


def _check(value: Any, schema: dict, where: str) -> Any:
    """Check one value against a (small) JSON schema: type, enum, items, nested objects, bounds."""
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            errors = []
            for branch in schema[key]:
                try:
                    value = _check(value, branch, where)
                    break
                except ToolArgumentError as e:
                    errors.append(str(e).split(": ", 1)[-1])
            else:
                raise ToolArgumentError(f"{where}: fits none of the allowed forms ({'; '.join(errors)})")
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else list(types)
        ok = False
        for t in types:
            py = _JSON_TYPES.get(t)
            if py is None:
                ok = True          # a type this checker does not know: accept it
                break
            # bool is an int in Python, but not in JSON
            if isinstance(value, bool) and t in ("integer", "number"):
                continue
            if t == "integer" and isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, py):
                ok = True
                break
        if not ok:
            raise ToolArgumentError(f"{where}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.60}")
    if "enum" in schema and value not in schema["enum"]:
        raise ToolArgumentError(f"{where}: {value!r:.60} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ToolArgumentError(f"{where}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ToolArgumentError(f"{where}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, dict) and ("properties" in schema or "required" in schema):
        value = _check_object(value, schema, where)
    if isinstance(value, (list, tuple)):
        if "minItems" in schema and len(value) < schema["minItems"]:
            raise ToolArgumentError(f"{where}: needs at least {schema['minItems']} items, got {len(value)}")
        if "items" in schema and isinstance(schema["items"], dict):
            value = [_check(v, schema["items"], f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _check_object(value: dict, schema: dict, where: str) -> dict:
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in value]
    if missing:
        raise ToolArgumentError(f"{where}: missing required argument(s) {', '.join(missing)}")
    extra = schema.get("additionalProperties", False)
    out = {}
    for key, v in value.items():
        if key in props:
            out[key] = _check(v, props[key], f"{where}.{key}" if where else key)
        elif extra is False:
            raise ToolArgumentError(f"{where or 'arguments'}: unknown argument {key!r} (known: {', '.join(props) or 'none'})")
        elif isinstance(extra, dict):
            out[key] = _check(v, extra, f"{where}.{key}" if where else key)
        else:
            out[key] = v
    for key, p in props.items():
        if key not in out and isinstance(p, dict) and "default" in p:
            out[key] = p["default"]
    return out


def validate_arguments(tool: Tool, arguments: Any) -> dict:
    """Check `arguments` against `tool.parameters` (types, required, unknown keys, enums, bounds).

    Returns the arguments with schema defaults filled in; raises ToolArgumentError with a one-line reason.
    A JSON string is accepted and decoded (models send `arguments` as a string in the OpenAI format).
    """
    if isinstance(arguments, str):
        import json
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolArgumentError(f"arguments are not valid JSON: {e}") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ToolArgumentError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    return _check_object(arguments, tool.parameters, "")


def openai_tool_schema(tool: Tool) -> dict:
    """The tool as one entry of an OpenAI chat request's `tools` list."""
    return {"type": "function",
            "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters}}


def clip(text: str, limit: int = MAX_CONTENT_CHARS) -> str:
    """Bound a text for the model's context: keep its head and tail and say how much was cut."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters cut] ...\n{text[-tail:]}"
