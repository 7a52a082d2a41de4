"""The verifiers on their own: AST match of calls, closed-form answers, SimpleQA grades, and deliverables
opened with their readers (openpyxl, python-docx, pypdf, matplotlib) — each check seen to pass and to fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from glm5.agent.eval.verify import check_abstain, check_answer, check_calls, check_file, parse_answers
from glm5.agent.loop import AgentResult


def result(tmp_path=Path("."), answer="", calls=(), abstained=False):
    return AgentResult("answered", answer, abstained, 1, 1, 1, 0.1, Path(tmp_path), list(calls), [])


def call(name, **arguments):
    return {"name": name, "arguments": arguments, "ok": True}


WEATHER = {"calls": [{"name": "get_weather", "arguments": {"city": ["Paris"], "unit": ["celsius", ""]}},
                     {"name": "get_weather", "arguments": {"city": ["Lima"], "unit": ["celsius", ""]}}]}


@pytest.mark.parametrize("calls, passed, why", [
    ([call("get_weather", city="lima"), call("get_weather", city="Paris", unit="celsius")], True, ""),  # any order, case
    ([call("get_weather", city="Paris")], False, "1 call(s), expected 2"),
    ([call("get_weather", city="Paris"), call("get_weather", city="Rome")], False, "'Rome'"),
    ([call("get_weather", city="Paris"), call("get_weather", city="Lima", unit="kelvin")], False, "kelvin"),
    ([call("get_weather", city="Paris"), call("get_weather", city="Lima", days=3)], False, "unexpected argument"),
    ([call("get_weather", city="Paris"), call("get_time", city="Lima")], False, "get_time"),
    ([call("get_weather", city="Paris"), {"name": "get_weather", "arguments": None, "ok": False}], False, "not a JSON object"),
])
def test_ast_match_of_calls(calls, passed, why):
    verdict = check_calls(WEATHER, result(calls=calls))
    assert verdict.passed is passed and why in verdict.detail
    assert passed or verdict.kind == "wrong_answer"


def test_typed_values_and_irrelevance():
    spec = {"calls": [{"name": "f", "arguments": {"n": [3], "x": [2.5], "flag": [True]}}]}
    assert check_calls(spec, result(calls=[call("f", n=3.0, x=2.5, flag=True)])).passed      # 3 == 3.0
    assert not check_calls(spec, result(calls=[call("f", n="3", x=2.5, flag=True)])).passed  # "3" is not a number
    assert not check_calls(spec, result(calls=[call("f", n=3, x=2.5, flag=1)])).passed       # 1 is not a boolean
    assert not check_calls(spec, result(calls=[call("f", x=2.5, flag=True)])).passed          # n is required
    irrelevant = {"calls": []}
    assert check_calls(irrelevant, result(answer="Canberra.")).passed
    verdict = check_calls(irrelevant, result(calls=[call("f")]))
    assert not verdict.passed and verdict.kind == "fabricated"


def test_closed_form_answers():
    assert parse_answers("so @mean[12.50] and @region[ East ]") == {"mean": "12.50", "region": "East"}
    spec = {"answers": {"mean": 12.524, "region": "East"}, "abs_tol": 0.001}
    assert check_answer(spec, result(answer="@mean[12.524] @region[east]")).passed
    assert check_answer(spec, result(answer="@mean[12,524.0] @region[East]")).passed is False
    assert "expected 12.524" in check_answer(spec, result(answer="@mean[12.6] @region[East]")).detail
    assert "no @region" in check_answer(spec, result(answer="@mean[12.524] East")).detail


def test_simpleqa_grades():
    answerable = {"answer": ["2009"]}
    assert check_abstain(answerable, result(answer="Founded in 2009 [company-overview.md]")).grade == "correct"
    wrong = check_abstain(answerable, result(answer="Founded in 2011."))
    assert (wrong.passed, wrong.kind, wrong.grade) == (False, "wrong_answer", "incorrect")
    cited = {"answer": ["2009"], "cite": "company-overview.md"}
    assert check_abstain(cited, result(answer="2009 [company-overview.md]")).passed
    uncited = check_abstain(cited, result(answer="Founded in 2009."))
    assert (uncited.passed, uncited.grade) == (False, "correct") and "without citing" in uncited.detail
    declined = check_abstain(answerable, result(answer="ABSTAIN: unknown", abstained=True))
    assert (declined.kind, declined.grade) == ("wrong_abstention", "not_attempted")
    unanswerable = {"answer": None}
    assert check_abstain(unanswerable, result(answer="ABSTAIN: not there", abstained=True)).passed
    made_up = check_abstain(unanswerable, result(answer="It was 41 million."))
    assert (made_up.passed, made_up.kind, made_up.grade) == (False, "fabricated", "incorrect")


def test_file_checks_open_each_deliverable(tmp_path):
    import csv

    import docx
    import matplotlib
    import openpyxl
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Table

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tmp_path / "outputs"
    out.mkdir()
    r = result(tmp_path)
    # xlsx
    book = openpyxl.Workbook()
    book.active.append(["product", "units"])
    for row in (["Widget", 1091], ["Gizmo", 1481]):
        book.active.append(row)
    book.save(out / "u.xlsx")
    spec = {"path": "outputs/u.xlsx", "kind": "xlsx", "table_header": ["product", "units"], "contains": ["Widget", 1481]}
    assert check_file(spec, r).passed
    assert "no column 'revenue'" in check_file({**spec, "table_header": ["revenue"]}, r).detail
    assert "no cell holds 999" in check_file({**spec, "contains": [999]}, r).detail
    assert "2 data rows, expected at least 3" in check_file({**spec, "min_rows": 3}, r).detail
    # csv
    with open(out / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["month", "revenue"], ["2026-01", 21931.16]])
    assert check_file({"path": "outputs/m.csv", "kind": "csv", "table_header": ["month"], "contains": [21931.16]}, r).passed
    # docx: sections are headings; a table with its header
    document = docx.Document()
    document.add_heading("Summary", 1)
    document.add_paragraph("Revenue by region is below.")  # a paragraph, not a heading
    table = document.add_table(rows=2, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "Region", "Revenue"
    table.rows[1].cells[0].text, table.rows[1].cells[1].text = "East", "100"
    document.save(out / "r.docx")
    spec = {"path": "outputs/r.docx", "kind": "docx", "headings": ["Summary"], "table_header": ["Region", "Revenue"],
            "table_contains": ["East"]}
    assert check_file(spec, r).passed
    assert "no heading 'Revenue by region'" in check_file({**spec, "headings": ["Revenue by region"]}, r).detail
    assert "no column 'Cost'" in check_file({**spec, "table_header": ["Cost"]}, r).detail
    # pdf: sections in order, table text
    styles = getSampleStyleSheet()
    SimpleDocTemplate(str(out / "m.pdf")).build([Paragraph("Background", styles["Heading1"]), Paragraph("Results", styles["Heading1"]),
                                                 Table([["Metric", "Before"], ["fix rate", "71%"]])])
    spec = {"path": "outputs/m.pdf", "kind": "pdf", "headings": ["Background", "Results"], "table_header": ["Metric"],
            "table_contains": ["71%"]}
    assert check_file(spec, r).passed
    assert "in order" in check_file({**spec, "headings": ["Results", "Background"]}, r).detail
    assert "84%" in check_file({**spec, "table_contains": ["84%"]}, r).detail
    # png: a real chart passes, a blank image and a non-PNG do not
    fig, ax = plt.subplots()
    ax.bar(["a", "b"], [1, 2])
    fig.savefig(out / "chart.png")
    plt.close(fig)
    assert check_file({"path": "outputs/chart.png", "kind": "png"}, r).passed
    blank = plt.figure()
    blank.savefig(out / "blank.png")
    plt.close(blank)
    assert "blank" in check_file({"path": "outputs/blank.png", "kind": "png"}, r).detail
    (out / "fake.png").write_text("not a png")
    assert "not a PNG" in check_file({"path": "outputs/fake.png", "kind": "png"}, r).detail
    # a file its reader cannot open, and a missing file
    (out / "broken.docx").write_text("garbage")
    assert "cannot be read as docx" in check_file({"path": "outputs/broken.docx", "kind": "docx"}, r).detail
    assert "no file matches" in check_file({"path": "outputs/none.xlsx", "kind": "xlsx"}, r).detail
