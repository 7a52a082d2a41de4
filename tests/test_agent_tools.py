"""Each agent tool end to end: its deliverables opened with their own readers (openpyxl, python-docx, pypdf,
PIL), its refusals, and an MCP server's tool called through the SDK."""

import csv
import sys
from pathlib import Path

import openpyxl
import pytest

from glm5.agent import sandbox
from glm5.agent.tools import all_tools, tools_for_mode
from glm5.agent.tools.base import ToolArgumentError, ToolContext
from glm5.agent.tools.chart import ChartTool
from glm5.agent.tools.code import PythonTool, ShellTool
from glm5.agent.tools.documents import DocumentIndex, OpenTool, SearchTool, tokenize
from glm5.agent.tools.export import ExportTool
from glm5.agent.tools.sql import SqlTool

needs_sandbox = pytest.mark.skipif(not sandbox.sandbox_status().available, reason=sandbox.sandbox_status().summary)
SALES = "month,region,amount\nJan,north,10\nJan,south,3\nFeb,north,5\nFeb,south,6\nMar,north,7\nMar,south,9\n"


@pytest.fixture
def ctx(tmp_path):
    work = tmp_path / "work"
    (work / "inputs").mkdir(parents=True)
    (work / "inputs" / "sales.csv").write_text(SALES)
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Staff"
    for row in [("name", "age", "joined"), ("ann", 30, "2020-01-02"), ("bob", 41, "2019-05-06")]:
        ws.append(row)
    pay = wb.create_sheet("Pay")
    for row in [("name", "pay"), ("ann", 1.5), ("bob", 2.25)]:
        pay.append(row)
    wb.save(work / "inputs" / "people.xlsx")
    docs = tmp_path / "docs"
    docs.mkdir()
    return ToolContext(workdir=work, files=[work / "inputs" / "sales.csv"], docs_dir=docs, timeout_s=20,
                       memory_mb=1024)


# ---- python / shell ---------------------------------------------------------------------------------------

@needs_sandbox
def test_python_tool_returns_stdout_stderr_and_files(ctx):
    r = PythonTool()({"code": "import sys\nprint(sum(range(10)))\nprint('warn', file=sys.stderr)\n"
                              "open('outputs/n.txt', 'w').write('45')"}, ctx)
    assert r.ok and r.data["exit_code"] == 0
    assert "--- stdout ---\n45" in r.content and "--- stderr ---\nwarn" in r.content
    assert r.files == ["outputs/n.txt"] and "outputs/n.txt" in r.content
    bad = PythonTool()({"code": "raise SystemExit('no such column')"}, ctx)
    assert not bad.ok and bad.data["exit_code"] == 1 and "no such column" in bad.content


@needs_sandbox
def test_python_tool_reports_a_timeout_and_shell_runs_bash(ctx):
    r = PythonTool()({"code": "while True: pass", "timeout_s": 1}, ctx)
    assert not r.ok and r.data["timed_out"] and "TIMED OUT" in r.content
    r = ShellTool()({"code": "ls inputs | sort; echo $((6*7)) > outputs/x.txt"}, ctx)
    assert r.ok and r.content.split("--- stdout ---\n")[1].split()[:2] == ["people.xlsx", "sales.csv"]
    assert (ctx.workdir / "outputs/x.txt").read_text() == "42\n" and r.files == ["outputs/x.txt"]


def test_code_tools_refuse_without_a_sandbox(ctx, monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_status",
                        lambda: sandbox.SandboxStatus(False, "none", False, "bwrap is not installed"))
    for tool in (PythonTool(), ShellTool()):
        r = tool({"code": "print(1)"}, ctx)
        assert not r.ok and r.data["refused"] and "bwrap is not installed" in r.content
    ctx.unsafe_no_sandbox = True
    r = PythonTool()({"code": "print(6 * 7)"}, ctx)
    assert r.ok and "42" in r.content and r.data["sandboxed"] is False
    with pytest.raises(ToolArgumentError, match="empty"):
        PythonTool()({"code": "  "}, ctx)


# ---- sql ------------------------------------------------------------------------------------------------

def test_sql_over_csv_and_every_xlsx_sheet(ctx):
    r = SqlTool()({"query": "SHOW TABLES"}, ctx)
    assert [row[0] for row in r.data["rows"]] == ["people", "people_pay", "sales"]
    r = SqlTool()({"query": "select region, sum(amount) as total from sales group by region order by region"}, ctx)
    assert r.ok and r.data["columns"] == ["region", "total"] and r.data["rows"] == [["north", 22], ["south", 18]]
    assert "| north | 22 |" in r.content
    r = SqlTool()({"query": "select p.name, age * pay as x from people p join people_pay q using (name) order by 1"}, ctx)
    assert r.data["rows"] == [["ann", 45.0], ["bob", 92.25]]


def test_sql_caps_rows_and_is_read_only(ctx):
    r = SqlTool()({"query": "select * from range(5000)", "max_rows": 7}, ctx)
    assert len(r.data["rows"]) == 7 and r.data["truncated"] and "more rows" in r.content
    for q in ("drop table sales", "insert into sales values ('Apr', 'east', 1)", "copy sales to 'x.csv'",
              "select 1; select 2", "set enable_external_access = true"):
        with pytest.raises(ToolArgumentError):
            SqlTool()({"query": q}, ctx)
    r = SqlTool()({"query": "select * from read_csv('/etc/passwd')"}, ctx)     # a SELECT that reads a file
    assert not r.ok and "disabled" in r.content
    secret = ctx.workdir.parent / "secret.csv"
    secret.write_text("password\nhunter2\n")
    (ctx.workdir / "outputs").mkdir()
    (ctx.workdir / "outputs" / "planted.csv").symlink_to(secret)      # e.g. made by code in the sandbox
    r = SqlTool()({"query": "SHOW TABLES"}, ctx)
    assert "planted" not in r.content
    r = SqlTool()({"query": "select * from no_such_table"}, ctx)
    assert not r.ok and "tables: people, people_pay, sales" in r.content
    assert not (ctx.workdir / "x.csv").exists()


# ---- chart ----------------------------------------------------------------------------------------------

def _png(path: Path):
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        return im.format, im.size, len(im.convert("RGB").getcolors(maxcolors=1 << 24))


@pytest.mark.parametrize("kind", ["line", "bar", "scatter", "hist", "pie"])
def test_chart_kinds_from_data_are_real_pngs(ctx, kind):
    args = {"kind": kind, "filename": f"{kind}.png", "title": f"A {kind}", "x": ["a", "b", "c"],
            "series": [{"name": "s", "values": [3, 1, 2]}]}
    r = ChartTool()(args, ctx)
    assert r.ok and r.files == [f"outputs/{kind}.png"]
    fmt, size, colours = _png(ctx.workdir / r.files[0])
    assert fmt == "PNG" and size == (880, 550) and colours > 10


def test_chart_from_sql_and_its_errors(ctx):
    r = ChartTool()({"kind": "bar", "filename": "charts/by_region.png", "xlabel": "region",
                     "sql": "select region, sum(amount) total, max(amount) best from sales group by 1 order by 1"}, ctx)
    assert r.ok and r.data["series"] == ["total", "best"] and r.data["points"] == 4
    assert _png(ctx.workdir / "charts/by_region.png")[0] == "PNG"
    with pytest.raises(ToolArgumentError, match="has 2 values but x has 3"):
        ChartTool()({"kind": "line", "filename": "x.png", "x": [1, 2, 3], "series": [{"values": [1, 2]}]}, ctx)
    with pytest.raises(ToolArgumentError, match="must end with .png"):
        ChartTool()({"kind": "line", "filename": "x.jpg", "series": [{"values": [1]}]}, ctx)
    with pytest.raises(ToolArgumentError, match="outside|'..'"):
        ChartTool()({"kind": "line", "filename": "../x.png", "series": [{"values": [1]}]}, ctx)
    with pytest.raises(ToolArgumentError, match="expected"):
        ChartTool()({"kind": "line", "filename": "x.png", "series": [{"values": ["ten"]}]}, ctx)


# ---- export ---------------------------------------------------------------------------------------------

BLOCKS = [
    {"type": "heading", "text": "Findings", "level": 1},
    {"type": "paragraph", "text": "North sold 22 units & south 18 <in total>."},
    {"type": "bullets", "items": ["north leads", "south grows"]},
    {"type": "table", "columns": ["region", "total"], "rows": [["north", 22], ["south", 18]], "caption": "Totals"},
    {"type": "heading", "text": "Chart", "level": 2},
    {"type": "image", "path": "outputs/trend.png", "caption": "Trend"},
]


def _with_chart(ctx):
    ChartTool()({"kind": "line", "filename": "trend.png", "x": [1, 2, 3], "series": [{"values": [1, 3, 2]}]}, ctx)


def test_export_xlsx_and_csv_read_back(ctx):
    r = ExportTool()({"format": "xlsx", "filename": "totals.xlsx", "tables": [
        {"name": "Totals", "columns": ["region", "total"], "rows": [["north", 22], ["south", 18.5]]},
        {"name": "Notes", "columns": ["note"], "rows": [["ok"]]}]}, ctx)
    assert r.ok and r.files == ["outputs/totals.xlsx"]
    wb = openpyxl.load_workbook(ctx.workdir / "outputs/totals.xlsx")
    assert wb.sheetnames == ["Totals", "Notes"]
    assert [list(row) for row in wb["Totals"].iter_rows(values_only=True)] == [["region", "total"], ["north", 22], ["south", 18.5]]
    r = ExportTool()({"format": "xlsx", "filename": "q.xlsx", "sql": "select month, sum(amount) s from sales group by 1 order by s"}, ctx)
    rows = list(openpyxl.load_workbook(ctx.workdir / "outputs/q.xlsx").active.iter_rows(values_only=True))
    assert rows == [("month", "s"), ("Feb", 11), ("Jan", 13), ("Mar", 16)]
    r = ExportTool()({"format": "csv", "filename": "out.csv", "tables": [{"columns": ["a", "b"], "rows": [[1, "x,y"], [2, None]]}]}, ctx)
    with open(ctx.workdir / "outputs/out.csv", newline="") as f:
        assert list(csv.reader(f)) == [["a", "b"], ["1", "x,y"], ["2", ""]]
    with pytest.raises(ToolArgumentError, match="row 0 has 1 cells"):
        ExportTool()({"format": "csv", "filename": "bad.csv", "tables": [{"columns": ["a", "b"], "rows": [[1]]}]}, ctx)
    assert not (ctx.workdir / "outputs/bad.csv").exists()


def test_export_docx_reads_back_with_python_docx(ctx):
    import docx
    _with_chart(ctx)
    r = ExportTool()({"format": "docx", "filename": "report.docx", "title": "Sales report", "blocks": BLOCKS}, ctx)
    assert r.ok and r.files == ["outputs/report.docx"]
    d = docx.Document(str(ctx.workdir / "outputs/report.docx"))
    assert d.core_properties.title == "Sales report"
    headings = [(p.style.name, p.text) for p in d.paragraphs if p.style.name.startswith(("Heading", "Title"))]
    assert headings == [("Title", "Sales report"), ("Heading 1", "Findings"), ("Heading 2", "Chart")]
    assert "North sold 22 units & south 18 <in total>." in [p.text for p in d.paragraphs]
    assert [p.text for p in d.paragraphs if p.style.name == "List Bullet"] == ["north leads", "south grows"]
    assert [[c.text for c in row.cells] for row in d.tables[0].rows] == [["region", "total"], ["north", "22"], ["south", "18"]]
    assert len(d.inline_shapes) == 1


def test_export_pdf_reads_back_with_pypdf(ctx):
    import pypdf
    _with_chart(ctx)
    r = ExportTool()({"format": "pdf", "filename": "report.pdf", "title": "Sales report", "blocks": BLOCKS}, ctx)
    assert r.ok
    reader = pypdf.PdfReader(str(ctx.workdir / "outputs/report.pdf"))
    text = "\n".join(p.extract_text() for p in reader.pages)
    for piece in ("Sales report", "Findings", "North sold 22 units & south 18 <in total>.", "north leads", "region",
                  "south", "Totals", "Trend"):
        assert piece in text, piece
    assert reader.metadata.title == "Sales report"
    images = [img for page in reader.pages for img in page.images]
    assert len(images) == 1
    with pytest.raises(ToolArgumentError, match="does not exist"):
        ExportTool()({"format": "pdf", "filename": "x.pdf", "blocks": [{"type": "image", "path": "outputs/none.png"}]}, ctx)
    with pytest.raises(ToolArgumentError, match="needs text"):
        ExportTool()({"format": "pdf", "filename": "x.pdf", "blocks": [{"type": "heading"}]}, ctx)


# ---- search / open --------------------------------------------------------------------------------------

def _docs(ctx):
    d = ctx.docs_dir
    (d / "oslo.md").write_text("# Oslo\n\nOslo is the capital of Norway.\nIts population is about 700,000.\n")
    (d / "bergen.html").write_text("<html><head><title>Bergen facts</title><script>var capital=1</script></head>"
                                   "<body><h1>Bergen</h1><p>Bergen is rainy: it rains 230 days a year.</p></body></html>")
    (d / "notes.txt").write_text("\n".join(f"filler line {i} about fjords" for i in range(40)) + "\nSalmon farming is big.\n")
    import docx
    doc = docx.Document()
    doc.core_properties.title = "Trondheim memo"
    doc.add_paragraph("Trondheim was the capital in the Viking age.")
    doc.save(str(d / "memo.docx"))
    ctx_pdf = ToolContext(workdir=ctx.workdir, files=[], docs_dir=None)
    ExportTool()({"format": "pdf", "filename": "tromso.pdf", "title": "Tromso",
                  "blocks": [{"type": "paragraph", "text": "Tromso has the northern lights and midnight sun."}]}, ctx_pdf)
    (ctx.workdir / "outputs/tromso.pdf").rename(d / "tromso.pdf")


def test_bm25_ranks_by_term_rarity_and_length():
    from glm5.agent.tools.documents import Document
    index = DocumentIndex(Path("."))
    index.add(Document("a", "", ["apple banana"]))
    index.add(Document("b", "", ["apple apple apple cherry"]))
    index.add(Document("c", "", ["banana " + "filler " * 29]))
    # 'cherry' is in one passage of three: idf = ln(1 + (3 - 1 + .5)/(1 + .5)); tf 1 in a 4-term passage
    import math
    avg = (2 + 4 + 30) / 3
    expected = math.log(1 + 2.5 / 1.5) * (1 * 2.5) / (1 + 1.5 * (0.25 + 0.75 * 4 / avg))
    [hit] = index.search("cherry")
    assert hit["doc_id"] == "b" and hit["score"] == pytest.approx(expected, abs=1e-4)
    assert [h["doc_id"] for h in index.search("banana")] == ["a", "c"]     # same tf: the short passage wins
    index.add(Document("d", "", [f"line {i}" for i in range(40)]))
    assert index.search("39")[0]["end_line"] == 40                          # the last lines are indexed too
    assert tokenize("The Capital of NORWAY's") == ["capital", "norway", "s"]


def test_search_and_open_over_every_format_with_citations(ctx):
    _docs(ctx)
    r = SearchTool()({"query": "capital of Norway"}, ctx)
    assert r.ok and r.data["results"][0]["doc_id"] == "oslo.md"
    assert {x["doc_id"] for x in r.data["results"]} == {"oslo.md", "memo.docx"}   # the script's 'capital' is not text
    assert r.data["results"][1]["title"] == "Trondheim memo"
    assert SearchTool()({"query": "rains days"}, ctx).data["results"][0]["title"] == "Bergen facts"
    hit = SearchTool()({"query": "salmon"}, ctx).data["results"][0]
    assert hit["doc_id"] == "notes.txt" and hit["start_line"] <= 41 <= hit["end_line"]
    assert SearchTool()({"query": "midnight sun"}, ctx).data["results"][0]["doc_id"] == "tromso.pdf"
    assert SearchTool()({"query": "kangaroo"}, ctx).data["results"] == []

    r = OpenTool()({"doc_id": "notes.txt", "start_line": 40, "max_lines": 5}, ctx)
    assert r.content.splitlines()[1:] == ["   40  filler line 39 about fjords", "   41  Salmon farming is big."]
    [cite] = r.data["citations"]
    assert cite == {"doc_id": "notes.txt", "title": "filler line 0 about fjords", "start_line": 40, "end_line": 41,
                    "char_offset": sum(len(f"filler line {i} about fjords") + 1 for i in range(39)), "via": "open"}
    r = OpenTool()({"doc_id": "tromso.pdf"}, ctx)
    assert "[page 1]" in r.content and "midnight sun" in r.content
    with pytest.raises(ToolArgumentError, match="did you mean oslo.md"):
        OpenTool()({"doc_id": "oslo"}, ctx)


def test_search_index_follows_changes_and_needs_a_folder(ctx, tmp_path):
    _docs(ctx)
    assert SearchTool()({"query": "glacier"}, ctx).data["results"] == []
    (ctx.docs_dir / "new.md").write_text("A glacier report.")
    assert SearchTool()({"query": "glacier"}, ctx).data["results"][0]["doc_id"] == "new.md"
    with pytest.raises(ToolArgumentError, match="no document folder"):
        SearchTool()({"query": "x"}, ToolContext(workdir=tmp_path, files=[], docs_dir=None))


# ---- MCP ------------------------------------------------------------------------------------------------

def test_mcp_server_tools_are_called_through_the_sdk(ctx):
    from glm5.agent.tools.mcp import MCPError, close_mcp_servers
    server = Path(__file__).parent / "data" / "mcp_demo_server.py"
    try:
        tools = {t.name: t for t in tools_for_mode("code", ctx, mcp_commands=[f"{sys.executable} {server}"])}
        assert {"add", "demo_read_file", "fail", "read_file", "python"} <= set(tools)
        assert tools["add"].parameters["required"] == ["a", "b"]
        r = tools["add"]({"a": 2, "b": 40}, ctx)
        assert r.ok and r.content == "42" and r.data["server"] == "demo"
        r = tools["demo_read_file"]({"path": "x.txt"}, ctx)
        assert r.content == "demo server read x.txt" and r.data["tool"] == "read_file"
        assert not tools["fail"]({"message": "boom"}, ctx).ok
        with pytest.raises(ToolArgumentError, match="expected integer"):
            tools["add"]({"a": "two", "b": 1}, ctx)
    finally:
        close_mcp_servers()
    with pytest.raises(MCPError, match="failed to start"):
        tools_for_mode("code", ctx, mcp_commands=[f"{sys.executable} -c 'raise SystemExit(3)'"])


def test_every_tool_has_a_schema_the_model_can_read():
    names = [t.name for t in all_tools()]
    assert len(names) == len(set(names)) == 10
    for t in all_tools():
        assert t.description and t.parameters["type"] == "object" and t.modes
        for key in t.parameters.get("required", []):
            assert key in t.parameters["properties"], (t.name, key)


def test_sql_reuses_the_loaded_data_until_a_file_changes(ctx):
    from glm5.agent.tools import sql
    q = {"query": "select sum(amount) from sales"}
    assert SqlTool()(q, ctx).data["rows"] == [[40]]
    con, _ = sql.database(ctx)
    assert SqlTool()(q, ctx).data["rows"] == [[40]] and sql.database(ctx)[0] is con     # loaded once
    with open(ctx.workdir / "inputs" / "sales.csv", "a") as f:
        f.write("Apr,east,100\n")
    assert SqlTool()(q, ctx).data["rows"] == [[140]]
    (ctx.workdir / "outputs").mkdir()
    (ctx.workdir / "outputs" / "made.csv").write_text("x\n1\n2\n")                 # e.g. written by python
    assert SqlTool()({"query": "select sum(x) from made"}, ctx).data["rows"] == [[3]]
