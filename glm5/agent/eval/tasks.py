"""Suites and task files.

A suite is a folder of `*.json` task files (directly in it) plus the data they use (in subfolders). Shipped suites live in `glm5/agent/suites/<name>/`; `--suite DIR` takes any folder. A task:

    {
      "id": "mean-price",                     # default: the file's stem; unique in the suite
      "category": "closed-form",              # groups tasks in the report (default: "default")
      "prompt": "What is the mean ... ? End with @mean_price[VALUE].",
      "mode": "data",                         # auto | data | write | code | research (default auto)
      "files": ["data/sales.csv"],            # input files, relative to the task file's folder
      "repo": "repos/calc",                   # a folder copied into the run's outputs/ (code tasks)
      "docs": "docs",                         # a document folder for search/open
      "tools": [{"type": "function", ...}],   # declared functions: one model call, its calls are checked
      "max_steps": 12, "timeout_s": 600,      # per run (defaults: the CLI's)
      "verify": [{"type": "answer", ...}],    # one check or a list; every one must pass (see verify.py)
      "reference": [{"tool_calls": [...]}, {"content": "..."}]   # a known-good replay (tests' scripted endpoint)
    }

Every problem is a one-line ValueError naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from glm5.agent.loop import MODES

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"
VERIFY_TYPES = ("calls", "answer", "abstain", "file", "tests")
_KEYS = {"id", "category", "prompt", "mode", "files", "repo", "docs", "tools", "max_steps", "timeout_s", "verify",
         "reference", "description"}


@dataclass
class Task:
    id: str
    prompt: str
    path: Path
    category: str = "default"
    mode: str = "auto"
    files: list[Path] = field(default_factory=list)
    repo: Path | None = None
    docs: Path | None = None
    tools: list[dict] = field(default_factory=list)
    max_steps: int | None = None
    timeout_s: float | None = None
    verify: list[dict] = field(default_factory=list)
    reference: list[dict] = field(default_factory=list)

    @property
    def unanswerable(self) -> bool:
        """An abstain task whose right answer is to decline."""
        return any(v["type"] == "abstain" and v.get("answer") is None for v in self.verify)


@dataclass
class Suite:
    name: str
    root: Path
    tasks: list[Task]


def shipped_suites() -> list[str]:
    return sorted(p.name for p in SUITES_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def _fail(path: Path, message: str):
    raise ValueError(f"{path}: {message}")


def _check_verify(path: Path, spec) -> list[dict]:
    specs = spec if isinstance(spec, list) else [spec]
    if not specs:
        _fail(path, "'verify' is empty: a task needs at least one check")
    for v in specs:
        if not isinstance(v, dict) or v.get("type") not in VERIFY_TYPES:
            _fail(path, f"each 'verify' entry needs a 'type' among {', '.join(VERIFY_TYPES)}; got {v!r:.80}")
        kind = v["type"]
        if kind == "calls" and not isinstance(v.get("calls"), list):
            _fail(path, "a 'calls' check needs 'calls': a list of {name, arguments} (empty: no call is right)")
        if kind == "calls":
            for c in v["calls"]:
                if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("arguments", {}), dict):
                    _fail(path, f"an expected call needs 'name' (string) and 'arguments' (object); got {c!r:.80}")
        if kind == "answer" and (not isinstance(v.get("answers"), dict) or not v["answers"]):
            _fail(path, "an 'answer' check needs 'answers': {name: value} for the @name[value] the answer must hold")
        if kind == "abstain" and "answer" not in v:
            _fail(path, "an 'abstain' check needs 'answer': a list of accepted answers, or null when none exists")
        if kind == "file" and (not isinstance(v.get("path"), str) or v.get("kind") not in ("png", "xlsx", "csv", "docx", "pdf")):
            _fail(path, "a 'file' check needs 'path' (a glob under the run folder) and 'kind' (png, xlsx, csv, docx, pdf)")
        if kind == "tests" and not isinstance(v.get("tests"), str):
            _fail(path, "a 'tests' check needs 'tests': the hidden test folder or file, relative to the task file")
        if kind == "tests" and not (path.parent / v["tests"]).exists():
            _fail(path, f"hidden tests {v['tests']!r} not found beside the task file")
    return specs


def load_task(path: Path) -> Task:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        _fail(path, f"not valid JSON ({err})")
    if not isinstance(data, dict):
        _fail(path, "a task file holds one JSON object")
    unknown = set(data) - _KEYS
    if unknown:
        _fail(path, f"unknown key(s) {', '.join(sorted(unknown))}; a task has {', '.join(sorted(_KEYS))}")
    if not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        _fail(path, "'prompt' (a non-empty string) is required")
    mode = data.get("mode", "auto")
    if mode not in MODES:
        _fail(path, f"'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    base = path.parent

    def existing(rel, what, folder=False):
        if not isinstance(rel, str):
            _fail(path, f"{what} must be a path string, got {rel!r}")
        p = (base / rel).resolve()
        if not (p.is_dir() if folder else p.is_file()):
            _fail(path, f"{what} {rel!r} not found (paths are relative to the task file)")
        return p

    files = data.get("files", [])
    if not isinstance(files, list):
        _fail(path, "'files' must be a list of paths")
    tools = data.get("tools", [])
    if not isinstance(tools, list) or any(not isinstance(t, dict) or not isinstance((t.get("function") or {}).get("name"), str)
                                          for t in tools):
        _fail(path, "'tools' must be a list of OpenAI function schemas ({type: function, function: {name, parameters}})")
    for key in ("max_steps",):
        if key in data and (not isinstance(data[key], int) or data[key] < 1):
            _fail(path, f"'{key}' must be a positive integer")
    if "timeout_s" in data and (not isinstance(data["timeout_s"], (int, float)) or data["timeout_s"] <= 0):
        _fail(path, "'timeout_s' must be a positive number")
    if "verify" not in data:
        _fail(path, "'verify' is required: how a run of this task is judged")
    reference = data.get("reference", [])
    if not isinstance(reference, list) or any(not isinstance(t, dict) for t in reference):
        _fail(path, "'reference' must be a list of assistant turns ({reasoning, content, tool_calls})")
    return Task(
        id=str(data.get("id", path.stem)), prompt=data["prompt"], path=path, category=str(data.get("category", "default")),
        mode=mode, files=[existing(f, "input file") for f in files],
        repo=existing(data["repo"], "repo", folder=True) if "repo" in data else None,
        docs=existing(data["docs"], "docs", folder=True) if "docs" in data else None,
        tools=tools, max_steps=data.get("max_steps"), timeout_s=data.get("timeout_s"),
        verify=_check_verify(path, data["verify"]), reference=reference)


def load_suite(name_or_dir: str | Path) -> Suite:
    """A shipped suite by name, or any folder of task files."""
    root = Path(name_or_dir)
    if not root.is_dir():
        shipped = SUITES_DIR / str(name_or_dir)
        if not shipped.is_dir():
            raise ValueError(f"no suite {name_or_dir!r}: not a folder, and the shipped suites are {', '.join(shipped_suites())}")
        root = shipped
    paths = sorted(p for p in root.glob("*.json") if not p.name.startswith(("_", ".")))
    if not paths:
        raise ValueError(f"suite {root} holds no *.json task files")
    tasks = [load_task(p) for p in paths]
    seen: dict[str, Path] = {}
    for t in tasks:
        if t.id in seen:
            raise ValueError(f"task id {t.id!r} appears twice: {seen[t.id]} and {t.path}")
        seen[t.id] = t.path
    return Suite(root.name, root, tasks)
