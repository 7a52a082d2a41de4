"""read_file / write_file / list_files: the model's view of its working directory, and nothing else.

Every path is relative to the run's workdir. `..`, absolute paths and symlinks that lead out of the workdir
are refused with a ToolArgumentError (the model sees why), so these tools never read or write outside it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import Tool, ToolArgumentError, ToolContext, ToolResult, clip

MAX_READ_CHARS = 50_000
MAX_WRITE_BYTES = 10 * 1024 * 1024
MAX_LIST_ENTRIES = 500


def resolve_inside(workdir: Path, path: str, *, must_exist: bool = False) -> Path:
    """`path` (relative, from the model) as an absolute path inside `workdir`, or ToolArgumentError.

    Refuses absolute paths, any `..` component and any path whose real location (symlinks followed) is not
    inside the workdir's real location.
    """
    if not isinstance(path, str) or not path.strip():
        raise ToolArgumentError("path must be a non-empty relative path inside the working directory")
    if "\x00" in path:
        raise ToolArgumentError("path contains a NUL byte")
    p = Path(path)
    if p.is_absolute() or path.startswith("~"):
        raise ToolArgumentError(f"{path!r} is absolute; give a path relative to the working directory")
    if ".." in p.parts:
        raise ToolArgumentError(f"{path!r} contains '..'; paths must stay inside the working directory")
    root = Path(os.path.realpath(workdir))
    target = Path(os.path.realpath(root / p))
    if target != root and root not in target.parents:
        raise ToolArgumentError(f"{path!r} leads outside the working directory (through a symlink)")
    if must_exist and not target.exists():
        raise ToolArgumentError(f"{path!r} does not exist in the working directory")
    return target


def deliverable_path(ctx: ToolContext, filename: str, suffixes: tuple[str, ...]) -> tuple[str, Path]:
    """(relative, absolute) path of a deliverable: under outputs/ unless the name already says where."""
    if not any(filename.lower().endswith(s) for s in suffixes):
        raise ToolArgumentError(f"filename {filename!r} must end with {' or '.join(suffixes)}")
    if "/" not in filename.replace("\\", "/"):
        filename = f"outputs/{filename}"
    target = resolve_inside(ctx.workdir, filename)
    if target.is_dir():
        raise ToolArgumentError(f"{filename!r} is a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.relative_to(os.path.realpath(ctx.workdir)).as_posix(), target


def relative(workdir: Path, path: Path) -> str:
    return Path(os.path.realpath(path)).relative_to(os.path.realpath(workdir)).as_posix()


class ReadFile(Tool):
    name = "read_file"
    description = ("Read a text file from the working directory. Returns its text with line numbers "
                   "(a slice with start_line/max_lines for long files).")
    parameters = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "path relative to the working directory, e.g. inputs/notes.md"},
            "start_line": {"type": "integer", "minimum": 1, "default": 1, "description": "first line to show (1-based)"},
            "max_lines": {"type": "integer", "minimum": 1, "default": 400, "description": "how many lines to show"},
        },
        "required": ["path"],
    }
    modes = frozenset({"data", "write", "code", "research"})

    def run(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        target = resolve_inside(ctx.workdir, arguments["path"], must_exist=True)
        if target.is_dir():
            raise ToolArgumentError(f"{arguments['path']!r} is a directory; use list_files")
        raw = target.read_bytes()
        if b"\x00" in raw[:8192]:
            return ToolResult(f"{arguments['path']} is a binary file ({len(raw)} bytes); read it with python",
                              ok=False, data={"bytes": len(raw)})
        lines = raw.decode("utf-8", errors="replace").splitlines()
        start, count = arguments["start_line"], arguments["max_lines"]
        shown = lines[start - 1:start - 1 + count]
        body = "\n".join(f"{start + i:>6}  {line}" for i, line in enumerate(shown))
        more = len(lines) - (start - 1 + len(shown))
        if more > 0:
            body += f"\n... {more} more lines (start_line={start + len(shown)})"
        return ToolResult(clip(body, MAX_READ_CHARS),
                          data={"path": relative(ctx.workdir, target), "lines": len(lines), "start_line": start,
                                "end_line": start + len(shown) - 1})


class WriteFile(Tool):
    name = "write_file"
    description = ("Write a text file in the working directory (parent folders are created; an existing file "
                   "is replaced). Put deliverables under outputs/.")
    parameters = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "path relative to the working directory, e.g. outputs/report.md"},
            "content": {"type": "string", "description": "the full text of the file"},
            "append": {"type": "boolean", "default": False, "description": "add to the end instead of replacing"},
        },
        "required": ["path", "content"],
    }
    modes = frozenset({"data", "write", "code", "research"})

    def run(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        target = resolve_inside(ctx.workdir, arguments["path"])
        data = arguments["content"].encode("utf-8")
        if len(data) > MAX_WRITE_BYTES:
            raise ToolArgumentError(f"content is {len(data)} bytes; the limit is {MAX_WRITE_BYTES}")
        if target.is_dir():
            raise ToolArgumentError(f"{arguments['path']!r} is a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        if arguments["append"]:
            with open(target, "ab") as f:
                f.write(data)
        else:
            # atomic: a crash leaves the old file or the new one, never half of one
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        rel = relative(ctx.workdir, target)
        return ToolResult(f"wrote {len(data)} bytes to {rel}", files=[rel], data={"bytes": len(data)})


class ListFiles(Tool):
    name = "list_files"
    description = "List the files under a folder of the working directory (recursively), with their sizes."
    parameters = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "default": ".", "description": "folder relative to the working directory"},
        },
    }
    modes = frozenset({"data", "write", "code", "research"})

    def run(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        path = arguments["path"]
        target = Path(os.path.realpath(ctx.workdir)) if path in (".", "./", "") else resolve_inside(
            ctx.workdir, path, must_exist=True)
        if not target.is_dir():
            raise ToolArgumentError(f"{path!r} is not a directory")
        entries = []
        for dirpath, dirnames, filenames in os.walk(target):       # os.walk does not follow symlinked dirs
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                try:
                    rel = relative(ctx.workdir, full)
                except ValueError:               # a symlink out of the workdir: not listed
                    continue
                entries.append((rel, full.stat().st_size if full.exists() else 0))
        lines = [f"{size:>10}  {rel}" for rel, size in entries[:MAX_LIST_ENTRIES]]
        if len(entries) > MAX_LIST_ENTRIES:
            lines.append(f"... {len(entries) - MAX_LIST_ENTRIES} more files")
        return ToolResult("\n".join(lines) if lines else "(no files)",
                          data={"files": [rel for rel, _ in entries]})
