"""chart: a matplotlib chart saved as a PNG under outputs/, from data the model gives or from a SQL query.

Data is either `x` plus `series` (each a name and its values), or `sql`: a query over the data files
(see the sql tool) whose first column is x and every other column a series. Kinds: line, bar (grouped
when several series), scatter, hist (each series' values are the samples; x unused), pie (x the labels,
one series the sizes). Drawn with matplotlib's object API on an Agg canvas, so no global pyplot state.
"""

from __future__ import annotations

import math
import os

from .base import Tool, ToolArgumentError, ToolContext, ToolResult
from .files import deliverable_path
from .sql import run_query

KINDS = ("line", "bar", "scatter", "hist", "pie")
MAX_POINTS = 100_000


def _number(v, where: str) -> float:
    if isinstance(v, bool) or v is None:
        raise ToolArgumentError(f"{where}: {v!r} is not a number")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ToolArgumentError(f"{where}: {v!r} is not a number") from None
    if math.isnan(f) or math.isinf(f):
        raise ToolArgumentError(f"{where}: {v!r} is not a finite number")
    return f


class ChartTool(Tool):
    name = "chart"
    description = ("Draw a chart and save it as a PNG under outputs/. Give the data as x plus series "
                   "([{name, values}]), or as sql: a query whose first column is x and the other columns "
                   "the series. kind: line, bar, scatter, hist (series values are samples) or pie (x labels, "
                   "one series of sizes).")
    parameters = {
        "type": "object",
        "properties": {
            "kind": {"type": "string", "enum": list(KINDS)},
            "filename": {"type": "string", "description": "PNG name, e.g. sales_by_month.png (saved under outputs/)"},
            "title": {"type": "string", "default": ""},
            "xlabel": {"type": "string", "default": ""},
            "ylabel": {"type": "string", "default": ""},
            "x": {"type": "array", "items": {"type": ["string", "number", "integer"]},
                  "description": "x values or category labels"},
            "series": {"type": "array", "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "values": {"type": "array", "items": {"type": ["number", "integer", "null"]}}},
                "required": ["values"]}},
            "sql": {"type": "string", "description": "instead of x/series: first column x, other columns series"},
        },
        "required": ["kind", "filename"],
    }
    modes = frozenset({"data", "write", "research"})

    def run(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        kind = arguments["kind"]
        x, series = self._data(arguments, ctx)
        rel, target = deliverable_path(ctx, arguments["filename"], (".png",))

        fig = Figure(figsize=(8, 5), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        categorical = any(isinstance(v, str) for v in x)
        if kind == "pie":
            if len(series) != 1:
                raise ToolArgumentError("a pie chart takes exactly one series (the sizes)")
            sizes = series[0][1]
            if any(v < 0 for v in sizes):
                raise ToolArgumentError("pie sizes must not be negative")
            ax.pie(sizes, labels=[str(v) for v in x] if x else None, autopct="%1.1f%%")
            ax.axis("equal")
        elif kind == "hist":
            for name, values in series:
                ax.hist([v for v in values if v is not None], bins="auto", alpha=0.6 if len(series) > 1 else 1.0,
                        label=name)
        elif kind == "bar":
            width = 0.8 / len(series)
            positions = list(range(len(x)))
            for i, (name, values) in enumerate(series):
                ax.bar([p + (i - (len(series) - 1) / 2) * width for p in positions],
                       [0 if v is None else v for v in values], width=width, label=name)
            ax.set_xticks(positions, [str(v) for v in x], rotation=45 if len(x) > 8 else 0,
                          ha="right" if len(x) > 8 else "center")
        else:
            xs = list(range(len(x))) if categorical else x
            for name, values in series:
                if kind == "line":
                    ax.plot(xs, values, marker="o" if len(values) <= 30 else None, label=name)
                else:
                    ax.scatter(xs, values, label=name, s=18)
            if categorical:
                ax.set_xticks(xs, [str(v) for v in x], rotation=45 if len(x) > 8 else 0)
        ax.set_title(arguments["title"])
        if kind != "pie":
            ax.set_xlabel(arguments["xlabel"])
            ax.set_ylabel(arguments["ylabel"])
            ax.grid(alpha=0.3)
        if len(series) > 1 or (kind != "pie" and series and series[0][0]):
            ax.legend()
        fig.tight_layout()
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}.png")
        fig.savefig(tmp, format="png")
        os.replace(tmp, target)
        n = sum(len(v) for _, v in series)
        return ToolResult(f"saved {kind} chart to {rel} ({len(series)} series, {n} values)", files=[rel],
                          data={"path": rel, "kind": kind, "series": [s for s, _ in series], "points": n})

    def _data(self, arguments: dict, ctx: ToolContext):
        if arguments.get("sql"):
            if "x" in arguments or "series" in arguments:
                raise ToolArgumentError("give either sql or x/series, not both")
            columns, rows, more, _ = run_query(ctx, arguments["sql"], MAX_POINTS)
            if more:
                raise ToolArgumentError(f"the query returned more than {MAX_POINTS} rows; aggregate first")
            if not rows:
                raise ToolArgumentError("the query returned no rows")
            if arguments["kind"] == "hist":
                cols = list(range(len(columns)))
                x = []
            else:
                if len(columns) < 2:
                    raise ToolArgumentError("the query needs two columns or more: x, then the series")
                cols = list(range(1, len(columns)))
                x = [r[0] if isinstance(r[0], (int, float)) and not isinstance(r[0], bool) else str(r[0]) for r in rows]
            series = [(columns[c], [None if r[c] is None else _number(r[c], columns[c]) for r in rows]) for c in cols]
            return x, series
        series_in = arguments.get("series")
        if not series_in:
            raise ToolArgumentError("give the data: x and series, or sql")
        x = list(arguments.get("x") or [])
        series = []
        for i, s in enumerate(series_in):
            values = [None if v is None else _number(v, f"series[{i}]") for v in s["values"]]
            if not values:
                raise ToolArgumentError(f"series[{i}] has no values")
            if len(values) > MAX_POINTS:
                raise ToolArgumentError(f"series[{i}] has {len(values)} values; the limit is {MAX_POINTS}")
            series.append((s.get("name", ""), values))
        kind = arguments["kind"]
        if kind != "hist":
            if not x:
                x = list(range(1, len(series[0][1]) + 1))
            for name, values in series:
                if len(values) != len(x):
                    raise ToolArgumentError(f"series {name or ''!r} has {len(values)} values but x has {len(x)}")
        return x, series
