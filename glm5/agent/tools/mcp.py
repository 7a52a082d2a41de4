"""MCP: the tools of any Model Context Protocol server, started over stdio with the official `mcp` SDK.

    tools = mcp_tools(["python -m my_server", "npx some-mcp-server --flag"])
    ...                                  # each is a Tool; calling it calls the server's tool
    close_mcp_servers()                  # or at interpreter exit

Each `--mcp CMD` is split like a shell command line and started as a stdio server (its stderr goes to a
log, not the terminal). Its tools are listed once and wrapped: name, description and input schema as the
server gives them; a name already taken (by a built-in tool or another server) gets the server's name as a
prefix. The SDK is asynchronous, so the sessions live on one event loop in a background thread and tool
calls are submitted to it. MCP servers are programs the user chose to run: they run as the agent's user,
outside the sandbox.
"""

from __future__ import annotations

import asyncio
import atexit
import re
import shlex
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from .base import Tool, ToolArgumentError, ToolContext, ToolResult, clip

START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 120.0


class MCPError(RuntimeError):
    """An MCP server could not be started or listed (the message says which and why)."""


class _Loop:
    """One asyncio loop in a daemon thread for every MCP session of this process."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="glm5-mcp", daemon=True)
        self.thread.start()

    def submit(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_loop: _Loop | None = None
_servers: list[MCPServer] = []
_lock = threading.Lock()


def _get_loop() -> _Loop:
    global _loop
    with _lock:
        if _loop is None:
            _loop = _Loop()
        return _loop


class MCPServer:
    """One running stdio server: its session, its tools, and the task that keeps it open."""

    def __init__(self, command: str, cwd: str | Path | None = None):
        argv = shlex.split(command)
        if not argv:
            raise MCPError("empty --mcp command")
        self.command, self.argv, self.cwd = command, argv, cwd
        self.name = Path(argv[0]).name
        self.session = None
        self.tools: list = []
        self.errlog = tempfile.TemporaryFile("w+", prefix="glm5-mcp-", suffix=".log")
        self._stop: asyncio.Event | None = None
        self._task = None

    async def _serve(self, ready: asyncio.Future):
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client
        self._stop = asyncio.Event()
        params = StdioServerParameters(command=self.argv[0], args=self.argv[1:],
                                       cwd=str(self.cwd) if self.cwd else None)
        try:
            async with stdio_client(params, errlog=self.errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    init = await session.initialize()
                    info = getattr(init, "serverInfo", None) or getattr(init, "server_info", None)
                    if info is not None and getattr(info, "name", None):
                        self.name = info.name
                    self.tools = await _list_all_tools(session)
                    self.session = session
                    ready.set_result(True)
                    await self._stop.wait()
        except BaseException as e:                   # noqa: BLE001 - reported to the starter, then re-raised
            if not ready.done():
                ready.set_exception(e)
            if not isinstance(e, Exception):
                raise

    def start(self) -> None:
        loop = _get_loop()

        async def launch():
            ready = asyncio.get_running_loop().create_future()
            self._task = asyncio.ensure_future(self._serve(ready))
            await asyncio.wait_for(ready, START_TIMEOUT_S)

        try:
            loop.submit(launch(), START_TIMEOUT_S + 5)
        except Exception as e:
            self.close()
            raise MCPError(f"MCP server {self.command!r} failed to start: {_why(e)}{self._log_tail()}") from None

    def call(self, tool: str, arguments: dict, timeout: float) -> object:
        if self.session is None:
            raise MCPError(f"MCP server {self.name!r} is not running")
        return _get_loop().submit(self.session.call_tool(tool, arguments), timeout)

    def close(self) -> None:
        if self._stop is not None and _loop is not None:
            async def stop():
                self._stop.set()
                if self._task is not None:
                    try:
                        await asyncio.wait_for(self._task, 10)
                    except Exception:
                        self._task.cancel()
            try:
                _loop.submit(stop(), 15)
            except Exception:
                pass
        self.session = None
        self._stop = None

    def _log_tail(self) -> str:
        try:
            self.errlog.seek(0)
            lines = [line for line in self.errlog.read().splitlines() if line.strip()][-5:]
        except (OSError, ValueError):
            return ""
        return ("\n  server log: " + "\n  ".join(lines)) if lines else ""


def _why(e: BaseException) -> str:
    # anyio wraps errors of the server's task group in ExceptionGroups: show the innermost
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def _list_all_tools(session) -> list:
    result = await session.list_tools()
    tools = list(result.tools)
    cursor = getattr(result, "nextCursor", None) or getattr(result, "next_cursor", None)
    while cursor:                       # pagination (rare); the params' shape differs across SDK versions
        try:
            from mcp.types import PaginatedRequestParams
            result = await session.list_tools(params=PaginatedRequestParams(cursor=cursor))
        except TypeError:
            result = await session.list_tools(cursor=cursor)
        tools += list(result.tools)
        cursor = getattr(result, "nextCursor", None) or getattr(result, "next_cursor", None)
    return tools


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:64] or "tool"


class MCPTool(Tool):
    """A server's tool as a glm5 Tool: same name (or server-prefixed), description and input schema."""

    modes = frozenset({"auto", "data", "write", "code", "research"})

    def __init__(self, server: MCPServer, spec, name: str):
        self.server, self.remote_name, self.name = server, spec.name, name
        self.description = (spec.description or f"the {spec.name} tool of the MCP server {server.name}").strip()
        schema = dict(getattr(spec, "inputSchema", None) or getattr(spec, "input_schema", None) or {})
        schema.setdefault("type", "object")
        schema.setdefault("properties", {})
        self.parameters = schema

    def run(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        try:
            result = self.server.call(self.remote_name, arguments, max(CALL_TIMEOUT_S, ctx.timeout_s))
        except TimeoutError:
            return ToolResult(f"MCP tool {self.name} did not answer in time", ok=False)
        except MCPError as e:
            return ToolResult(str(e), ok=False)
        except Exception as e:
            return ToolResult(f"MCP tool {self.name} failed: {_why(e)}", ok=False)
        parts = []
        for item in getattr(result, "content", []) or []:
            kind = getattr(item, "type", "")
            if kind == "text":
                parts.append(item.text)
            elif kind in ("image", "audio"):
                parts.append(f"[{kind} content, {getattr(item, 'mimeType', None) or getattr(item, 'mime_type', '')}]")
            elif kind == "resource":
                res = item.resource
                parts.append(getattr(res, "text", None) or f"[resource {getattr(res, 'uri', '')}]")
            else:
                parts.append(f"[{kind or 'unknown'} content]")
        is_error = bool(getattr(result, "isError", False) or getattr(result, "is_error", False))
        structured = getattr(result, "structuredContent", None) or getattr(result, "structured_content", None)
        return ToolResult(clip("\n".join(parts) or "(no content)"), ok=not is_error,
                          data={"server": self.server.name, "tool": self.remote_name, "structured": structured})


def mcp_tools(commands: Sequence[str], *, taken: Iterable[str] = (), cwd: str | Path | None = None) -> list[Tool]:
    """Start each stdio MCP server in `commands` and wrap its tools; `taken` names need a prefix.

    Raises MCPError (one line: which server, why) if a server fails to start; servers started before it
    are closed again.
    """
    taken_names = set(taken)
    tools: list[Tool] = []
    started: list[MCPServer] = []
    try:
        for command in commands:
            server = MCPServer(command, cwd=cwd)
            server.start()
            started.append(server)
            for spec in server.tools:
                name = _safe_name(spec.name)
                if name in taken_names:
                    name = _safe_name(f"{server.name}_{spec.name}")
                if name in taken_names:
                    raise MCPError(f"MCP tool name {spec.name!r} of {command!r} clashes with another tool")
                taken_names.add(name)
                tools.append(MCPTool(server, spec, name))
    except Exception:
        for s in started:
            s.close()
        raise
    with _lock:
        _servers.extend(started)
    return tools


def close_mcp_servers() -> None:
    """Stop every MCP server this process started."""
    with _lock:
        servers = list(_servers)
        _servers.clear()
    for s in servers:
        s.close()


atexit.register(close_mcp_servers)

__all__ = ["MCPError", "MCPServer", "MCPTool", "ToolArgumentError", "close_mcp_servers", "mcp_tools"]
