"""The agent's tools, and which of them each mode offers.

    from glm5.agent.tools import tools_for_mode
    tools = tools_for_mode("research", ctx, mcp_commands=["python -m my_server"])

Modes: `data` (sql, chart, export, python, files), `write` (export, files, search/open), `code` (python,
shell, files), `research` (search/open, files), `auto` (all of them). MCP servers' tools join every mode.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import MODES, Tool, ToolArgumentError, ToolContext, ToolResult, openai_tool_schema, validate_arguments

__all__ = ["MODES", "Tool", "ToolArgumentError", "ToolContext", "ToolResult", "all_tools", "openai_tool_schema",
           "tools_for_mode", "validate_arguments"]


def all_tools() -> list[Tool]:
    """One instance of every built-in tool (imported here so that `base` stays light)."""
    from .files import ListFiles, ReadFile, WriteFile
    tools: list[Tool] = [ReadFile(), WriteFile(), ListFiles()]
    return tools


def tools_for_mode(mode: str, ctx: ToolContext, mcp_commands: Sequence[str] = ()) -> list[Tool]:
    """The tools a run in `mode` offers the model, plus every tool of the MCP servers `mcp_commands` start.

    The MCP servers stay up until `glm5.agent.tools.mcp.close_mcp_servers()` (or interpreter exit).
    """
    if mode not in MODES:
        raise ValueError(f"unknown agent mode {mode!r}; choose one of {', '.join(MODES)}")
    tools = [t for t in all_tools() if mode == "auto" or mode in t.modes]
    if mcp_commands:
        from .mcp import mcp_tools
        tools += mcp_tools(list(mcp_commands))
    return tools
