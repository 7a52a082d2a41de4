"""python and shell: code the model writes, run in the OS sandbox (`glm5.agent.sandbox`) inside the workdir.

The code sees the workdir as its current folder (inputs under inputs/, deliverables go to outputs/), has
no network, and runs under the context's time and memory limits. Where the machine gives no sandbox both
tools refuse (the model is told why) unless the run was started with --unsafe-no-sandbox.
"""

from __future__ import annotations

import sys

from .. import sandbox
from .base import Tool, ToolArgumentError, ToolContext, ToolResult, clip

MAX_CODE_CHARS = 100_000          # one argv string stays under Linux's 128 KiB limit


def _report(r: sandbox.SandboxResult, limit_s: float) -> ToolResult:
    parts = []
    if r.timed_out:
        parts.append(f"TIMED OUT after {limit_s:g} s (the process was killed)")
    if r.out_of_memory:
        parts.append("OUT OF MEMORY (the memory limit was reached)")
    parts.append(f"exit code {r.exit_code}")
    if r.stdout:
        parts.append(f"--- stdout ---\n{clip(r.stdout, 12_000)}")
    if r.stderr:
        parts.append(f"--- stderr ---\n{clip(r.stderr, 6_000)}")
    if r.files:
        parts.append("files made or changed: " + ", ".join(r.files[:50]) + (" ..." if len(r.files) > 50 else ""))
    return ToolResult("\n".join(parts), ok=r.ok, files=list(r.files),
                      data={"exit_code": r.exit_code, "timed_out": r.timed_out, "out_of_memory": r.out_of_memory,
                            "sandboxed": r.sandboxed, "truncated": r.truncated})


def _refusal() -> ToolResult:
    status = sandbox.sandbox_status()
    return ToolResult(f"refused: this machine has no sandbox for running code ({status.detail}); "
                      "use the other tools", ok=False, data={"refused": True})


class _SandboxedTool(Tool):
    def _argv(self, code: str) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        code = arguments["code"]
        if not code.strip():
            raise ToolArgumentError("code is empty")
        if len(code) > MAX_CODE_CHARS:
            raise ToolArgumentError(f"code is {len(code)} characters; the limit is {MAX_CODE_CHARS} (write a file first)")
        if not sandbox.sandbox_status().available and not ctx.unsafe_no_sandbox:
            return _refusal()
        timeout = min(float(arguments.get("timeout_s") or ctx.timeout_s), ctx.timeout_s)
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        (ctx.workdir / "outputs").mkdir(exist_ok=True)
        r = sandbox.run(self._argv(code), ctx.workdir, timeout_s=timeout, memory_mb=ctx.memory_mb,
                        unsafe_no_sandbox=ctx.unsafe_no_sandbox)
        return _report(r, timeout)


class PythonTool(_SandboxedTool):
    name = "python"
    description = ("Run Python 3 code in a sandbox whose current folder is the working directory (input files "
                   "under inputs/, save deliverables under outputs/); there is no network. Print what you need to "
                   "see: returns stdout, stderr, the exit code and the files made.")
    parameters = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "description": "a complete Python program"},
            "timeout_s": {"type": "number", "minimum": 1, "description": "seconds before it is killed (capped by the run's limit)"},
        },
        "required": ["code"],
    }
    modes = frozenset({"data", "code"})

    def __init__(self):
        import importlib.util
        have = [m for m in ("numpy", "pandas", "matplotlib", "scipy", "sklearn", "duckdb", "openpyxl", "docx", "pypdf")
                if importlib.util.find_spec(m) is not None]
        if have:     # the model should know what it may import, and nothing can be installed (no network)
            self.description = f"{type(self).description} Installed: {', '.join(have)}."

    def _argv(self, code: str) -> list[str]:
        return [sys.executable, "-c", code]


class ShellTool(_SandboxedTool):
    name = "shell"
    description = ("Run a bash script in a sandbox whose current folder is the working directory (no network, "
                   "no sudo). Use it to run tests, git, grep, or the project's own commands. Returns stdout, "
                   "stderr, the exit code and the files made.")
    parameters = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "description": "bash commands, e.g. 'python -m pytest -q'"},
            "timeout_s": {"type": "number", "minimum": 1, "description": "seconds before it is killed (capped by the run's limit)"},
        },
        "required": ["code"],
    }
    modes = frozenset({"code"})

    def _argv(self, code: str) -> list[str]:
        return ["bash", "-c", code]
