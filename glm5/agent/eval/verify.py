"""Verifiers: does a run do what its task asks? Each check returns a Verdict; a task passes when all do.

    calls    BFCL-style AST match of the model's tool calls (function-calling): names, every required parameter
             present, no unknown parameter, each value of its declared type and among the accepted values
             (strings compared case- and punctuation-insensitively, 3 == 3.0; "" in a list marks an optional
             parameter); calls matched in any order. `calls: []` (irrelevance): the right answer is no call.
    answer   closed-form answers written as @name[value] in the final answer (InfiAgent-DABench's format);
             numbers within `rel_tol` (default 1e-3) or `abs_tol`, text normalized.
    abstain  SimpleQA grading against a local document folder: `answer: null` means nothing answers it, so
             declining is correct; otherwise an accepted answer must appear in the final answer (and, with
             `cite`, that document's name: a right but uncited answer is graded correct yet fails the task).
    file     a deliverable opened with its reader: png (matplotlib), xlsx (openpyxl), csv, docx (python-docx),
             pdf (pypdf); required headings (sections), a table's header and cells, rows, text.
    tests    hidden tests copied beside the run's outputs/ and run with pytest in the sandbox.

How a failure is named (`Verdict.kind`): `wrong_answer`, `fabricated` (answered or called a function where
nothing fits), `wrong_abstention` (declined although the answer was there).
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm5.agent.loop import AgentResult


@dataclass
class Verdict:
    passed: bool
    kind: str | None = None      # failure class when not passed
    grade: str | None = None     # SimpleQA: correct / incorrect / not_attempted (abstain checks)
    detail: str = ""


# ---- values ----------------------------------------------------------------------------------------------
def normalize_text(value: str) -> str:
    """BFCL's string normalization: case, spaces and common punctuation do not count."""
    return re.sub(r"[\s,./\-_*^'\"!?:;()]+", "", str(value).lower())


def values_equal(actual: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(actual, bool) and isinstance(expected, bool) and actual == expected
    if isinstance(expected, (int, float)):
        return isinstance(actual, (int, float)) and math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(expected, str):
        return isinstance(actual, str) and normalize_text(actual) == normalize_text(expected)
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(map(values_equal, actual, expected))
    if isinstance(expected, dict):
        return (isinstance(actual, dict) and set(actual) == set(expected)
                and all(values_equal(actual[k], expected[k]) for k in expected))
    return actual == expected


# ---- calls (function calling) ----------------------------------------------------------------------------
def _call_matches(actual: dict, expected: dict) -> str | None:
    if actual["name"] != expected["name"]:
        return f"called {actual['name']!r}, expected {expected['name']!r}"
    args = actual.get("arguments")
    if not isinstance(args, dict):
        return f"{actual['name']}: arguments are not a JSON object"
    allowed = expected.get("arguments", {})
    unknown = set(args) - set(allowed)
    if unknown:
        return f"{actual['name']}: unexpected argument(s) {', '.join(sorted(unknown))}"
    for name, accepted in allowed.items():
        accepted = accepted if isinstance(accepted, list) else [accepted]
        if name not in args:
            if "" in accepted:
                continue  # optional
            return f"{actual['name']}: missing argument {name!r}"
        if not any(values_equal(args[name], a) for a in accepted if a != "" or args[name] == ""):
            return f"{actual['name']}: {name}={args[name]!r} is not among {[a for a in accepted if a != '']!r:.120}"
    return None


def check_calls(spec: dict, result: AgentResult) -> Verdict:
    expected = spec["calls"]
    actual = result.calls
    if not expected:
        if actual:
            return Verdict(False, "fabricated", detail=f"no function fits, yet it called {', '.join(c['name'] for c in actual)}")
        return Verdict(True)
    if not actual:
        return Verdict(False, "wrong_answer", detail="made no function call")
    if len(actual) != len(expected):
        return Verdict(False, "wrong_answer", detail=f"{len(actual)} call(s), expected {len(expected)}")
    free = list(range(len(actual)))
    for e in expected:  # each expected call takes the first actual call that matches it (order does not count)
        reasons = [(i, _call_matches(actual[i], e)) for i in free]
        match = next((i for i, why in reasons if why is None), None)
        if match is None:
            return Verdict(False, "wrong_answer", detail=reasons[0][1] if reasons else "no call left")
        free.remove(match)
    return Verdict(True)


# ---- closed-form answers ---------------------------------------------------------------------------------
_ANSWER_RE = re.compile(r"@(\w+)\[([^\]]*)\]")


def parse_answers(text: str) -> dict[str, str]:
    """`@name[value]` pairs of a final answer (the last one of a name wins)."""
    return {m.group(1): m.group(2).strip() for m in _ANSWER_RE.finditer(text or "")}


def _number(text: str) -> float | None:
    try:
        return float(str(text).replace(",", "").replace("%", "").strip())
    except ValueError:
        return None


def answer_matches(given: str, expected: Any, rel_tol: float, abs_tol: float) -> bool:
    options = expected if isinstance(expected, list) else [expected]
    for option in options:
        if isinstance(option, (int, float)) and not isinstance(option, bool):
            number = _number(given)
            if number is not None and math.isclose(number, option, rel_tol=rel_tol, abs_tol=abs_tol):
                return True
        elif normalize_text(given) == normalize_text(str(option)):
            return True
    return False


def check_answer(spec: dict, result: AgentResult) -> Verdict:
    given = parse_answers(result.answer)
    rel, abs_ = float(spec.get("rel_tol", 1e-3)), float(spec.get("abs_tol", 0.0))
    for name, expected in spec["answers"].items():
        if name not in given:
            return Verdict(False, "wrong_answer", detail=f"no @{name}[...] in the final answer")
        if not answer_matches(given[name], expected, rel, abs_):
            return Verdict(False, "wrong_answer", detail=f"@{name}[{given[name]}], expected {expected}")
    return Verdict(True)


# ---- abstention (SimpleQA grades) ------------------------------------------------------------------------
def check_abstain(spec: dict, result: AgentResult) -> Verdict:
    accepted = spec["answer"]
    if accepted is None:
        if result.abstained:
            return Verdict(True, grade="correct")
        return Verdict(False, "fabricated", grade="incorrect", detail="answered a question the documents do not answer")
    if result.abstained:
        return Verdict(False, "wrong_abstention", grade="not_attempted", detail="declined, but the documents hold the answer")
    text = normalize_text(result.answer)
    accepted = accepted if isinstance(accepted, list) else [accepted]
    if any(normalize_text(a) in text for a in accepted):
        cite = spec.get("cite")
        if cite and cite.lower() not in result.answer.lower():
            return Verdict(False, "wrong_answer", grade="correct", detail=f"right answer without citing {cite}")
        return Verdict(True, grade="correct")
    return Verdict(False, "wrong_answer", grade="incorrect", detail=f"none of {accepted!r:.80} in the answer")


# ---- files -----------------------------------------------------------------------------------------------
def _has_text(haystack: str, needle: str) -> bool:
    return " ".join(str(needle).lower().split()) in " ".join(haystack.lower().split())


def _cell_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value).strip()


def _check_rows(rows: list[list[str]], spec: dict, where: str) -> str | None:
    if not rows:
        return f"{where} is empty"
    header = [h.lower() for h in rows[0]]
    for column in spec.get("table_header", []):
        if column.lower() not in header:
            return f"{where}: no column {column!r} in its header {rows[0]!r:.120}"
    if len(rows) - 1 < int(spec.get("min_rows", 0)):
        return f"{where}: {len(rows) - 1} data rows, expected at least {spec['min_rows']}"
    cells = [c for row in rows for c in row]
    for want in spec.get("contains", []):
        if isinstance(want, (int, float)):
            if not any((n := _number(c)) is not None and math.isclose(n, want, rel_tol=1e-3) for c in cells):
                return f"{where}: no cell holds {want}"
        elif not any(_has_text(c, want) for c in cells):
            return f"{where}: no cell holds {want!r}"
    return None


def _docx_problem(path: Path, spec: dict) -> str | None:
    import docx

    document = docx.Document(str(path))
    headings = [p.text for p in document.paragraphs if (p.style is not None and p.style.name or "").lower().startswith(("heading", "title"))]
    for want in spec.get("headings", []):
        if not any(_has_text(h, want) for h in headings):
            return f"{path.name}: no heading {want!r} (headings: {headings!r:.160})"
    if spec.get("table_header") or spec.get("min_rows") or spec.get("table_contains"):
        if not document.tables:
            return f"{path.name}: no table"
        problems = []
        for table in document.tables:
            rows = [[cell.text.strip() for cell in row.cells] for row in table.rows]
            why = _check_rows(rows, {**spec, "contains": spec.get("table_contains", [])}, f"{path.name} table")
            if why is None:
                break
            problems.append(why)
        else:
            return problems[0]
    text = "\n".join(p.text for p in document.paragraphs)
    for want in spec.get("contains", []):
        if not _has_text(text, want):
            return f"{path.name}: the text does not mention {want!r}"
    return None


def _pdf_problem(path: Path, spec: dict) -> str | None:
    from pypdf import PdfReader

    text = "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)
    position = 0
    flat = " ".join(text.lower().split())
    for want in spec.get("headings", []):  # sections in the order given
        found = flat.find(" ".join(want.lower().split()), position)
        if found < 0:
            return f"{path.name}: section {want!r} not found (in order) in the PDF's text"
        position = found
    for want in [*spec.get("table_header", []), *map(str, spec.get("table_contains", [])), *spec.get("contains", [])]:
        if not _has_text(text, want):
            return f"{path.name}: the PDF's text does not hold {want!r}"
    if spec.get("min_pages") and len(PdfReader(str(path)).pages) < spec["min_pages"]:
        return f"{path.name}: fewer than {spec['min_pages']} pages"
    return None


def _png_problem(path: Path, spec: dict) -> str | None:
    import numpy as np
    from matplotlib import image

    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return f"{path.name} is not a PNG file"
    pixels = image.imread(str(path))
    height, width = pixels.shape[:2]
    if min(height, width) < int(spec.get("min_size", 100)):
        return f"{path.name} is {width}x{height} pixels, too small for a chart"
    if len(np.unique(pixels.reshape(-1, pixels.shape[-1] if pixels.ndim == 3 else 1), axis=0)) < 3:
        return f"{path.name} is blank (fewer than 3 colours)"
    return None


def check_file(spec: dict, result: AgentResult) -> Verdict:
    matches = sorted(p for p in result.workdir.glob(spec["path"]) if p.is_file())
    if not matches:
        return Verdict(False, "wrong_answer", detail=f"no file matches {spec['path']}")
    problems = []
    for path in matches:  # any matching file that passes is enough
        kind = spec["kind"]
        try:
            if kind == "png":
                why = _png_problem(path, spec)
            elif kind == "xlsx":
                import openpyxl

                book = openpyxl.load_workbook(path, read_only=True, data_only=True)
                sheet = book[spec["sheet"]] if spec.get("sheet") in book.sheetnames else book.worksheets[0]
                rows = [[_cell_text(v) for v in row] for row in sheet.iter_rows(values_only=True)]
                why = _check_rows([r for r in rows if any(r)], spec, path.name)
            elif kind == "csv":
                with open(path, newline="", encoding="utf-8-sig") as f:
                    rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
                why = _check_rows(rows, spec, path.name)
            elif kind == "docx":
                why = _docx_problem(path, spec)
            else:
                why = _pdf_problem(path, spec)
        except Exception as err:  # a deliverable its reader cannot open is a wrong deliverable, not a crash
            why = f"{path.name} cannot be read as {kind}: {type(err).__name__}: {err}"
        if why is None:
            return Verdict(True)
        problems.append(why)
    return Verdict(False, "wrong_answer", detail=problems[0])


# ---- hidden tests ----------------------------------------------------------------------------------------
def check_tests(spec: dict, result: AgentResult, task_dir: Path, timeout_s: float = 120.0) -> Verdict:
    from glm5.agent import sandbox

    check_dir = result.workdir / "verify"
    if check_dir.exists():
        shutil.rmtree(check_dir)
    shutil.copytree(result.workdir / "outputs", check_dir)
    hidden = task_dir / spec["tests"]
    target = check_dir / "hidden_tests"
    if hidden.is_dir():
        shutil.copytree(hidden, target)
    else:
        target.mkdir()
        shutil.copy2(hidden, target / hidden.name)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "hidden_tests"]
    try:
        out = sandbox.run(command, check_dir, timeout_s=float(spec.get("timeout_s", timeout_s)),
                          memory_mb=int(spec.get("memory_mb", 2048)))
    except Exception as err:
        return Verdict(False, "wrong_answer", detail=f"the hidden tests could not run: {type(err).__name__}: {err}")
    if out.exit_code == 0 and not out.timed_out:
        return Verdict(True)
    lines = [ln for ln in (out.stdout + "\n" + out.stderr).splitlines() if ln.strip()]
    return Verdict(False, "wrong_answer", detail="hidden tests failed: " + (lines[-1] if lines else f"exit {out.exit_code}"))


def verify(task, result: AgentResult) -> Verdict:
    """All of a task's checks on a finished run; the first that fails decides the verdict."""
    if result.abstained and not task.unanswerable:
        return Verdict(False, "wrong_abstention", grade="not_attempted", detail="declined a task that has an answer")
    grade = None
    for spec in task.verify:
        kind = spec["type"]
        if kind == "calls":
            verdict = check_calls(spec, result)
        elif kind == "answer":
            verdict = check_answer(spec, result)
        elif kind == "abstain":
            verdict = check_abstain(spec, result)
        elif kind == "file":
            verdict = check_file(spec, result)
        else:
            verdict = check_tests(spec, result, task.path.parent)
        grade = verdict.grade or grade
        if not verdict.passed:
            return verdict
    return Verdict(True, grade=grade)
