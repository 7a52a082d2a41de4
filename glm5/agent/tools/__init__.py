"""The agent's tools, and which of them each mode offers.

    from glm5.agent.tools import tools_for_mode
    tools = tools_for_mode("research", ctx, mcp_commands=["python -m my_server"])

| tool | modes | what it does |
|---|---|---|
| python | data, code | Python in the OS sandbox (`glm5.agent.sandbox`), workdir as its folder |
| shell | code | bash in the OS sandbox |
| read_file, write_file, list_files | all | files inside the workdir only |
| sql | data | read-only DuckDB over the CSV / XLSX / Parquet inputs, a table per file stem |
| chart | data, write, research | matplotlib PNG under outputs/ from data or a query |
| export | data, write, research | xlsx, csv, docx, pdf under outputs/ |
| search, open | write, research | BM25 over the local document folder; reads with line numbers for citations |
| MCP servers' tools | all | `--mcp CMD`: each stdio server's tools through the `mcp` SDK |

`auto` offers every tool.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .base import MODES, Tool, ToolArgumentError, ToolContext, ToolResult, openai_tool_schema, validate_arguments

__all__ = ["MODES", "Tool", "ToolArgumentError", "ToolContext", "ToolResult", "all_tools", "openai_tool_schema",
           "tools_for_mode", "validate_arguments"]


def all_tools() -> list[Tool]:
    """One instance of every built-in tool (imported here so that `base` stays light)."""
    from .chart import ChartTool
    from .code import PythonTool, ShellTool
    from .documents import OpenTool, SearchTool
    from .export import ExportTool
    from .files import ListFiles, ReadFile, WriteFile
    from .sql import SqlTool
    return [PythonTool(), ShellTool(), ReadFile(), WriteFile(), ListFiles(), SqlTool(), ChartTool(), ExportTool(),
            SearchTool(), OpenTool()]


def tools_for_mode(mode: str, ctx: ToolContext, mcp_commands: Sequence[str] = ()) -> list[Tool]:
    """The tools a run in `mode` offers the model, plus every tool of the MCP servers `mcp_commands` start.

    The MCP servers stay up until `glm5.agent.tools.mcp.close_mcp_servers()` (or interpreter exit).
    """
    if mode not in MODES:
        raise ValueError(f"unknown agent mode {mode!r}; choose one of {', '.join(MODES)}")
    tools = [t for t in all_tools() if mode == "auto" or mode in t.modes]
    if mcp_commands:
        from .mcp import mcp_tools
        tools += mcp_tools(list(mcp_commands), taken=[t.name for t in all_tools()],
                           cwd=ctx.workdir if Path(ctx.workdir).is_dir() else None)
    return tools
