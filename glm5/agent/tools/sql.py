"""sql: read-only DuckDB over the run's data files, each a table named after its file stem.

The input files (`ctx.files`) and the CSV / XLSX / Parquet files under the workdir's inputs/ and outputs/
are loaded into an in-memory DuckDB (`sales.csv` -> table `sales`; each sheet after the first of a workbook
-> `book_sheetname`). Then external access is switched off and the configuration locked, and only one
SELECT-like statement per call is accepted (SELECT, WITH, SHOW, DESCRIBE, SUMMARIZE, EXPLAIN): the query can
neither change the tables nor read or write any other file. Results are capped at `max_rows` rows.

`run_query(ctx, sql)` is the same query path for the chart and export tools. The loaded database is kept
while the files stay unchanged (path, size, mtime), so a run's queries load each file once.
"""

from __future__ import annotations

import datetime
import decimal
import os
import re
import threading
from pathlib import Path

from .base import Tool, ToolArgumentError, ToolContext, ToolResult, clip

DATA_SUFFIXES = (".csv", ".tsv", ".xlsx", ".xlsm", ".parquet")
ROW_CAP = 1000
MAX_FILE_SCAN = 2000


def table_name(stem: str) -> str:
    name = re.sub(r"\W+", "_", stem.strip().lower()).strip("_") or "table"
    return f"t_{name}" if name[0].isdigit() else name


def data_files(ctx: ToolContext) -> list[Path]:
    """The files to load, first the inputs as given, then data files found under inputs/ and outputs/."""
    found: list[Path] = [Path(f) for f in ctx.files if Path(f).suffix.lower() in DATA_SUFFIXES]
    for sub in ("inputs", "outputs"):
        folder = ctx.workdir / sub
        if folder.is_dir():
            scanned = 0
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames.sort()
                for name in sorted(filenames):
                    scanned += 1
                    if Path(name).suffix.lower() in DATA_SUFFIXES and scanned <= MAX_FILE_SCAN:
                        found.append(Path(dirpath) / name)
    given = len([f for f in ctx.files if Path(f).suffix.lower() in DATA_SUFFIXES])
    root = os.path.realpath(ctx.workdir)
    out, seen = [], set()
    for i, f in enumerate(found):
        real = os.path.realpath(f)
        # a link the sandboxed code planted in the workdir must not make this (unsandboxed) process read
        # a file outside it; the user's own input files may live anywhere
        if i >= given and not real.startswith(root + os.sep):
            continue
        if real not in seen and os.path.isfile(real):
            seen.add(real)
            out.append(f)
    return out


def _xlsx_rows(path: Path) -> list[tuple[str, list[str], list[tuple]]]:
    """(sheet, header, rows) per non-empty sheet; the first row is the header."""
    import openpyxl
    wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        sheets = []
        for ws in wb.worksheets:
            rows = [tuple(r) for r in ws.iter_rows(values_only=True)]
            rows = [r for r in rows if any(v is not None for v in r)]
            if not rows:
                continue
            width = max(len(r) for r in rows)
            header = [str(h) if h is not None else f"column{i + 1}" for i, h in enumerate(list(rows[0]) + [None] * (width - len(rows[0])))]
            body = [tuple(list(r) + [None] * (width - len(r))) for r in rows[1:]]
            sheets.append((ws.title, header, body))
        return sheets
    finally:
        wb.close()


def _sql_type(values: list) -> str:
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return "VARCHAR"
    if kinds <= {bool}:
        return "BOOLEAN"
    if kinds <= {int}:
        return "BIGINT"
    if kinds <= {int, float, decimal.Decimal}:
        return "DOUBLE"
    if kinds <= {datetime.datetime, datetime.date}:
        return "TIMESTAMP"
    return "VARCHAR"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def connect(ctx: ToolContext):
    """A locked in-memory DuckDB with every data file as a table; returns (connection, {table: file})."""
    import duckdb
    con = duckdb.connect(":memory:")
    tables: dict[str, str] = {}

    def free(name: str) -> str:
        base, n = name, 2
        while name in tables:
            name, n = f"{base}_{n}", n + 1
        return name

    for f in data_files(ctx):
        suffix = f.suffix.lower()
        rel = os.path.relpath(f, ctx.workdir) if str(os.path.realpath(f)).startswith(os.path.realpath(ctx.workdir)) else f.name
        try:
            if suffix in (".csv", ".tsv"):
                name = free(table_name(f.stem))
                con.execute(f"CREATE TABLE {_quote(name)} AS SELECT * FROM read_csv_auto(?, header=true)", [str(f)])
                tables[name] = rel
            elif suffix == ".parquet":
                name = free(table_name(f.stem))
                con.execute(f"CREATE TABLE {_quote(name)} AS SELECT * FROM read_parquet(?)", [str(f)])
                tables[name] = rel
            else:
                for i, (sheet, header, rows) in enumerate(_xlsx_rows(f)):
                    name = free(table_name(f.stem if i == 0 else f"{f.stem}_{sheet}"))
                    cols = ", ".join(f"{_quote(h)} {_sql_type([r[j] for r in rows])}" for j, h in enumerate(header))
                    con.execute(f"CREATE TABLE {_quote(name)} ({cols})")
                    if rows:
                        marks = ", ".join("?" * len(header))
                        con.executemany(f"INSERT INTO {_quote(name)} VALUES ({marks})", [list(r) for r in rows])
                    tables[name] = f"{rel} [{sheet}]"
        except Exception as e:                 # a broken file is skipped, and said so
            tables[f"(skipped {f.name})"] = f"could not load: {str(e).splitlines()[0][:200]}"
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con, tables


_READ_ONLY = {"SELECT", "EXPLAIN"}


def run_query(ctx: ToolContext, query: str, max_rows: int = ROW_CAP):
    """(columns, rows, more, tables): at most max_rows rows; `more` is True when the result had more."""
    import duckdb
    query = query.strip().rstrip(";").strip()
    if not query:
        raise ToolArgumentError("query is empty")
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise ToolArgumentError(f"SQL does not parse: {str(e).splitlines()[0]}") from None
    if len(statements) != 1:
        raise ToolArgumentError(f"give exactly one statement, got {len(statements)}")
    kind = statements[0].type.name
    if kind not in _READ_ONLY:
        raise ToolArgumentError(f"read-only: {kind} statements are not allowed; use SELECT")
    con, tables = database(ctx)
    cur = con.cursor()              # one cursor per query: the cached database may serve several threads
    try:
        cur.execute(query)
        columns = [d[0] for d in cur.description] if cur.description else []
        rows = cur.fetchmany(max_rows + 1)
    finally:
        cur.close()
    return columns, rows[:max_rows], len(rows) > max_rows, tables


_DATABASES: dict[tuple, tuple] = {}
_DATABASES_LOCK = threading.Lock()
_MAX_DATABASES = 4


def database(ctx: ToolContext):
    """`connect(ctx)`, loaded once and reused while the data files stay the same (path, size, mtime)."""
    key = (os.path.realpath(ctx.workdir),) + tuple(
        (os.path.realpath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in data_files(ctx))
    with _DATABASES_LOCK:
        if key not in _DATABASES:
            while len(_DATABASES) >= _MAX_DATABASES:
                _, (old, _) = _DATABASES.popitem()
                old.close()
            _DATABASES[key] = connect(ctx)
        return _DATABASES[key]


def format_table(columns: list[str], rows: list[tuple]) -> str:
    """A Markdown pipe table (what the model reads)."""
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def jsonable(v):
    if isinstance(v, (datetime.date, datetime.datetime, datetime.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)


class SqlTool(Tool):
    name = "sql"
    description = ("Query the data files with DuckDB SQL (read-only). Each CSV/XLSX/Parquet input is a table "
                   "named after its file name without extension (sales.csv -> sales). Start with "
                   "'SHOW TABLES' or 'DESCRIBE sales'. One SELECT per call; returns at most max_rows rows.")
    parameters = {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "one SELECT (or SHOW TABLES / DESCRIBE t / SUMMARIZE t)"},
            "max_rows": {"type": "integer", "minimum": 1, "maximum": ROW_CAP, "default": 50,
                         "description": "the most rows to return"},
        },
        "required": ["query"],
    }
    modes = frozenset({"data"})

    def run(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        import duckdb
        try:
            columns, rows, more, tables = run_query(ctx, arguments["query"], arguments["max_rows"])
        except duckdb.Error as e:
            _, tables = database(ctx)
            known = ", ".join(sorted(tables)) or "none"
            return ToolResult(f"SQL error: {str(e).strip()[:1500]}\n(tables: {known})", ok=False,
                              data={"error": str(e)[:1500]})
        text = format_table(columns, rows)
        if more:
            text += f"\n... more rows (showing the first {len(rows)}; aggregate or add LIMIT/OFFSET)"
        elif not rows:
            text += "\n(no rows)"
        return ToolResult(clip(text), data={"columns": columns, "rows": [[jsonable(v) for v in r] for r in rows],
                                            "truncated": more, "tables": tables})

