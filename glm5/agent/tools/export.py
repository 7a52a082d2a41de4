"""export: deliverables as files under outputs/: xlsx (openpyxl), csv, docx (python-docx), pdf (reportlab).

Spreadsheets take `tables` (each a sheet: name, columns, rows) or `sql` (one table from a query over the
data files). Documents take `title` and `blocks`: heading (text, level 1-3), paragraph (text), bullets
(items), table (columns, rows, optional caption) and image (path of a PNG/JPEG in the workdir, e.g. a chart
the chart tool made). Files are written to a temporary name and renamed, so a failed export leaves nothing
half-written.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .base import Tool, ToolArgumentError, ToolContext, ToolResult
from .files import deliverable_path, resolve_inside
from .sql import jsonable, run_query

FORMATS = ("xlsx", "csv", "docx", "pdf")
MAX_ROWS = 100_000

_TABLE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "sheet name (xlsx)"},
        "columns": {"type": "array", "items": {"type": "string"}},
        "rows": {"type": "array", "items": {"type": "array"}},
    },
    "required": ["columns", "rows"],
}
_BLOCK = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["heading", "paragraph", "bullets", "table", "image"]},
        "text": {"type": "string", "description": "heading or paragraph text"},
        "level": {"type": "integer", "minimum": 1, "maximum": 3, "description": "heading level"},
        "items": {"type": "array", "items": {"type": "string"}, "description": "bullet points"},
        "columns": {"type": "array", "items": {"type": "string"}, "description": "table header"},
        "rows": {"type": "array", "items": {"type": "array"}, "description": "table rows"},
        "caption": {"type": "string"},
        "path": {"type": "string", "description": "image file in the working directory, e.g. outputs/chart.png"},
    },
    "required": ["type"],
}


def _cell(v):
    v = jsonable(v)
    return "" if v is None else v


def _check_table(t: dict, where: str) -> tuple[list[str], list[list]]:
    columns, rows = [str(c) for c in t.get("columns") or []], t.get("rows")
    if not columns:
        raise ToolArgumentError(f"{where}: a table needs columns")
    if rows is None:
        raise ToolArgumentError(f"{where}: a table needs rows")
    if len(rows) > MAX_ROWS:
        raise ToolArgumentError(f"{where}: {len(rows)} rows; the limit is {MAX_ROWS}")
    for i, r in enumerate(rows):
        if not isinstance(r, list) or len(r) != len(columns):
            raise ToolArgumentError(f"{where}: row {i} has {len(r) if isinstance(r, list) else '?'} cells, "
                                    f"the header {len(columns)}")
        for v in r:
            if isinstance(v, (dict, list)):
                raise ToolArgumentError(f"{where}: row {i} has a nested value; cells are numbers or text")
    return columns, rows


class ExportTool(Tool):
    name = "export"
    description = ("Write a deliverable under outputs/: format xlsx or csv from tables ([{name, columns, rows}]) "
                   "or an sql query; format docx or pdf from a title and blocks (heading, paragraph, bullets, "
                   "table, image of a PNG in the workdir, e.g. a chart).")
    parameters = {
        "type": "object",
        "properties": {
            "format": {"type": "string", "enum": list(FORMATS)},
            "filename": {"type": "string", "description": "e.g. report.pdf (saved under outputs/)"},
            "title": {"type": "string", "description": "document title (docx/pdf)"},
            "blocks": {"type": "array", "items": _BLOCK, "description": "document content in order (docx/pdf)"},
            "tables": {"type": "array", "items": _TABLE, "description": "sheets (xlsx) or one table (csv)"},
            "sql": {"type": "string", "description": "instead of tables: a query over the data files (xlsx/csv)"},
        },
        "required": ["format", "filename"],
    }
    modes = frozenset({"data", "write", "research"})

    def run(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        fmt = arguments["format"]
        rel, target = deliverable_path(ctx, arguments["filename"], (f".{fmt}",))
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}{target.suffix}")
        try:
            if fmt in ("xlsx", "csv"):
                tables = self._tables(arguments, ctx)
                summary = self._xlsx(tables, tmp) if fmt == "xlsx" else self._csv(tables, tmp)
            else:
                blocks = arguments.get("blocks") or []
                if not blocks and not arguments.get("title"):
                    raise ToolArgumentError("a document needs a title or blocks")
                images = self._images(blocks, ctx)
                if fmt == "docx":
                    summary = self._docx(arguments.get("title", ""), blocks, images, tmp)
                else:
                    summary = self._pdf(arguments.get("title", ""), blocks, images, tmp)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        return ToolResult(f"wrote {rel}: {summary}", files=[rel], data={"path": rel, "format": fmt,
                                                                        "bytes": target.stat().st_size})

    # ---- tables -------------------------------------------------------------------------------------
    def _tables(self, arguments: dict, ctx: ToolContext) -> list[tuple[str, list[str], list[list]]]:
        if arguments.get("sql"):
            if arguments.get("tables"):
                raise ToolArgumentError("give either sql or tables, not both")
            columns, rows, more, _ = run_query(ctx, arguments["sql"], MAX_ROWS)
            if more:
                raise ToolArgumentError(f"the query returned more than {MAX_ROWS} rows")
            return [("Sheet1", columns, [list(r) for r in rows])]
        tables = arguments.get("tables")
        if not tables:
            raise ToolArgumentError(f"{arguments['format']} needs tables or sql")
        out = []
        for i, t in enumerate(tables):
            columns, rows = _check_table(t, f"tables[{i}]")
            out.append((t.get("name") or f"Sheet{i + 1}", columns, rows))
        if arguments["format"] == "csv" and len(out) != 1:
            raise ToolArgumentError("csv holds one table; give one, or use xlsx for several")
        return out

    def _xlsx(self, tables, path: Path) -> str:
        import openpyxl
        from openpyxl.styles import Font
        wb = openpyxl.Workbook()
        wb.remove(wb.active)
        used = set()
        for name, columns, rows in tables:
            # sheet names: at most 31 characters, none of []:*?/\ , unique
            title = "".join(ch for ch in name if ch not in '[]:*?/\\')[:31] or "Sheet"
            base, n = title, 2
            while title.lower() in used:
                title, n = f"{base[:28]}_{n}", n + 1
            used.add(title.lower())
            ws = wb.create_sheet(title)
            ws.append(columns)
            for c in ws[1]:
                c.font = Font(bold=True)
            for r in rows:
                ws.append([_cell(v) for v in r])
            for i, col in enumerate(columns, start=1):
                width = max([len(str(col))] + [len(str(_cell(r[i - 1]))) for r in rows[:200]])
                ws.column_dimensions[openpyxl.utils.get_column_letter(i)].width = min(60, width + 2)
            ws.freeze_panes = "A2"
        wb.save(path)
        return ", ".join(f"sheet {t!r} {len(r)} rows x {len(c)} columns" for t, c, r in tables)

    def _csv(self, tables, path: Path) -> str:
        _, columns, rows = tables[0]
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows([[_cell(v) for v in r] for r in rows])
        return f"{len(rows)} rows x {len(columns)} columns"

    # ---- documents ----------------------------------------------------------------------------------
    def _images(self, blocks: list[dict], ctx: ToolContext) -> dict[int, Path]:
        images = {}
        for i, b in enumerate(blocks):
            kind = b["type"]
            need = {"heading": "text", "paragraph": "text", "bullets": "items", "table": "columns", "image": "path"}[kind]
            if not b.get(need):
                raise ToolArgumentError(f"blocks[{i}]: a {kind} block needs {need}")
            if kind == "table":
                _check_table(b, f"blocks[{i}]")
            if kind == "image":
                p = resolve_inside(ctx.workdir, b["path"], must_exist=True)
                if p.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                    raise ToolArgumentError(f"blocks[{i}]: images must be PNG or JPEG, got {p.name}")
                images[i] = p
        return images

    def _docx(self, title: str, blocks: list[dict], images: dict[int, Path], path: Path) -> str:
        import docx
        from docx.shared import Inches
        doc = docx.Document()
        if title:
            doc.core_properties.title = title
            doc.add_heading(title, level=0)
        for i, b in enumerate(blocks):
            kind = b["type"]
            if kind == "heading":
                doc.add_heading(b["text"], level=b.get("level", 1))
            elif kind == "paragraph":
                doc.add_paragraph(b["text"])
            elif kind == "bullets":
                for item in b["items"]:
                    doc.add_paragraph(item, style="List Bullet")
            elif kind == "table":
                columns, rows = b["columns"], b["rows"]
                table = doc.add_table(rows=1, cols=len(columns))
                table.style = "Table Grid"
                for cell, col in zip(table.rows[0].cells, columns):
                    cell.text = str(col)
                    for run in cell.paragraphs[0].runs:
                        run.bold = True
                for r in rows:
                    for cell, v in zip(table.add_row().cells, r):
                        cell.text = str(_cell(v))
                if b.get("caption"):
                    doc.add_paragraph(b["caption"], style="Caption")
            elif kind == "image":
                doc.add_picture(str(images[i]), width=Inches(6))
                if b.get("caption"):
                    doc.add_paragraph(b["caption"], style="Caption")
        doc.save(path)
        return _block_summary(blocks)

    def _pdf(self, title: str, blocks: list[dict], images: dict[int, Path], path: Path) -> str:
        from xml.sax.saxutils import escape

        from reportlab.lib import colors
        from reportlab.lib.pagesizes import A4
        from reportlab.lib.styles import getSampleStyleSheet
        from reportlab.lib.units import cm
        from reportlab.platypus import (
            Image,
            ListFlowable,
            ListItem,
            Paragraph,
            SimpleDocTemplate,
            Spacer,
            Table,
            TableStyle,
        )

        styles = getSampleStyleSheet()
        story = []
        if title:
            story += [Paragraph(escape(title), styles["Title"]), Spacer(1, 0.3 * cm)]
        width = A4[0] - 4 * cm
        for i, b in enumerate(blocks):
            kind = b["type"]
            if kind == "heading":
                story.append(Paragraph(escape(b["text"]), styles[f"Heading{b.get('level', 1)}"]))
            elif kind == "paragraph":
                for para in b["text"].split("\n\n"):
                    story.append(Paragraph(escape(para).replace("\n", "<br/>"), styles["BodyText"]))
            elif kind == "bullets":
                story.append(ListFlowable([ListItem(Paragraph(escape(t), styles["BodyText"])) for t in b["items"]],
                                          bulletType="bullet"))
            elif kind == "table":
                cell_style = styles["BodyText"]
                data = [[Paragraph(f"<b>{escape(str(c))}</b>", cell_style) for c in b["columns"]]]
                data += [[Paragraph(escape(str(_cell(v))), cell_style) for v in r] for r in b["rows"]]
                table = Table(data, repeatRows=1, colWidths=[width / len(b["columns"])] * len(b["columns"]))
                table.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.5, colors.grey),
                                           ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8e8f0")),
                                           ("VALIGN", (0, 0), (-1, -1), "TOP")]))
                story += [Spacer(1, 0.2 * cm), table]
                if b.get("caption"):
                    story.append(Paragraph(f"<i>{escape(b['caption'])}</i>", styles["BodyText"]))
                story.append(Spacer(1, 0.3 * cm))
            elif kind == "image":
                from reportlab.lib.utils import ImageReader
                w, h = ImageReader(str(images[i])).getSize()
                scale = min(1.0, width / w)
                story += [Spacer(1, 0.2 * cm), Image(str(images[i]), width=w * scale, height=h * scale)]
                if b.get("caption"):
                    story.append(Paragraph(f"<i>{escape(b['caption'])}</i>", styles["BodyText"]))
        doc = SimpleDocTemplate(str(path), pagesize=A4, title=title or "", leftMargin=2 * cm, rightMargin=2 * cm,
                                topMargin=2 * cm, bottomMargin=2 * cm)
        doc.build(story)
        return _block_summary(blocks)


def _block_summary(blocks: list[dict]) -> str:
    counts: dict[str, int] = {}
    for b in blocks:
        counts[b["type"]] = counts.get(b["type"], 0) + 1
    return ", ".join(f"{n} {k}{'s' if n > 1 else ''}" for k, n in counts.items()) or "title only"
