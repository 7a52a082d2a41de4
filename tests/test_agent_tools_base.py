"""The tool interface (argument checking, OpenAI schema, modes) and the workdir file tools."""

import os

import pytest

from glm5.agent.tools import MODES, tools_for_mode
from glm5.agent.tools.base import ToolArgumentError, ToolContext, openai_tool_schema, validate_arguments
from glm5.agent.tools.files import ListFiles, ReadFile, WriteFile


@pytest.fixture
def ctx(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    return ToolContext(workdir=work, files=[], docs_dir=None)


def test_validate_arguments_checks_types_required_unknown_and_fills_defaults():
    tool = ReadFile()
    assert validate_arguments(tool, {"path": "a.txt"}) == {"path": "a.txt", "start_line": 1, "max_lines": 400}
    assert validate_arguments(tool, '{"path": "a.txt", "max_lines": 3}')["max_lines"] == 3   # JSON string form
    with pytest.raises(ToolArgumentError, match="missing required argument"):
        validate_arguments(tool, {})
    with pytest.raises(ToolArgumentError, match="unknown argument 'colour'"):
        validate_arguments(tool, {"path": "a", "colour": "red"})
    with pytest.raises(ToolArgumentError, match="expected integer"):
        validate_arguments(tool, {"path": "a", "max_lines": "ten"})
    with pytest.raises(ToolArgumentError, match="expected integer"):
        validate_arguments(tool, {"path": "a", "max_lines": True})     # a JSON bool is not an integer
    with pytest.raises(ToolArgumentError, match="below the minimum"):
        validate_arguments(tool, {"path": "a", "start_line": 0})
    with pytest.raises(ToolArgumentError, match="not valid JSON"):
        validate_arguments(tool, "{path:")
    with pytest.raises(ToolArgumentError, match="JSON object"):
        validate_arguments(tool, ["a"])


def test_openai_schema_and_modes(ctx):
    schema = openai_tool_schema(ReadFile())
    assert schema["type"] == "function" and schema["function"]["name"] == "read_file"
    assert schema["function"]["parameters"]["required"] == ["path"]
    auto = {t.name for t in tools_for_mode("auto", ctx)}
    for mode in MODES:
        assert {t.name for t in tools_for_mode(mode, ctx)} <= auto
    with pytest.raises(ValueError, match="unknown agent mode"):
        tools_for_mode("chat", ctx)


def test_write_read_list_round_trip(ctx):
    r = WriteFile()({"path": "outputs/notes.md", "content": "one\ntwo\nthree\n"}, ctx)
    assert r.ok and r.files == ["outputs/notes.md"]
    assert (ctx.workdir / "outputs/notes.md").read_text() == "one\ntwo\nthree\n"
    r = ReadFile()({"path": "outputs/notes.md", "start_line": 2, "max_lines": 1}, ctx)
    assert r.content.split() == ["2", "two", "...", "1", "more", "lines", "(start_line=3)"]
    assert ListFiles()({}, ctx).data["files"] == ["outputs/notes.md"]
    WriteFile()({"path": "outputs/notes.md", "content": "four\n", "append": True}, ctx)
    assert (ctx.workdir / "outputs/notes.md").read_text().endswith("three\nfour\n")


@pytest.mark.parametrize("path", ["../escape.txt", "/etc/passwd", "outputs/../../x", "~/x", ""])
def test_paths_outside_the_workdir_are_refused(ctx, path):
    for tool, args in ((ReadFile(), {"path": path}), (WriteFile(), {"path": path, "content": "x"})):
        with pytest.raises(ToolArgumentError):
            tool(args, ctx)
    assert not (ctx.workdir.parent / "escape.txt").exists()


def test_symlinks_out_of_the_workdir_are_refused(ctx, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    os.symlink(secret, ctx.workdir / "link.txt")
    os.symlink(tmp_path, ctx.workdir / "updir")
    with pytest.raises(ToolArgumentError, match="outside the working directory"):
        ReadFile()({"path": "link.txt"}, ctx)
    with pytest.raises(ToolArgumentError, match="outside the working directory"):
        WriteFile()({"path": "updir/new.txt", "content": "x"}, ctx)
    assert not (tmp_path / "new.txt").exists()
    assert "link.txt" not in ListFiles()({}, ctx).content


def test_a_tool_that_raises_returns_a_failed_result(ctx):
    from glm5.agent.tools.base import Tool

    class Broken(Tool):
        name = "broken"
        parameters = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}

        def run(self, arguments, ctx):
            return ToolResult("fine") if arguments["n"] else 1 / 0

    from glm5.agent.tools.base import ToolResult
    assert Broken()({"n": 1}, ctx).ok
    r = Broken()({"n": 0}, ctx)
    assert not r.ok and r.content == "broken failed: ZeroDivisionError: division by zero"
    assert r.data["exception"] == "ZeroDivisionError"
    with pytest.raises(ToolArgumentError):          # bad arguments stay bad arguments, not a tool error
        Broken()({}, ctx)


def test_any_of_schemas_as_mcp_servers_write_optional_arguments():
    from glm5.agent.tools.base import Tool

    class Optional(Tool):
        name = "optional"
        parameters = {"type": "object", "properties": {
            "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None}}}

    assert validate_arguments(Optional(), {}) == {"limit": None}
    assert validate_arguments(Optional(), {"limit": 3}) == {"limit": 3}
    with pytest.raises(ToolArgumentError, match="fits none of the allowed forms"):
        validate_arguments(Optional(), {"limit": "three"})
