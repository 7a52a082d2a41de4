"""The project's text speaks of glm5 itself: no words about how the work on it was organised (work periods,
checks by other people, machines on loan) and no paths outside the repository.

    python -m pytest tests/test_project_text.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The same as: grep -rniE "<pattern>" README.md docs glm5 tests bench dev
PATTERN = re.compile(r"\blent\b|\.\./shared|\breview|\bsession [0-9]", re.IGNORECASE)
WHERE = ["README.md", "docs", "glm5", "tests", "bench", "dev"]
SKIP_SUFFIXES = {".pyc", ".so", ".png", ".safetensors", ".parquet"}


def _files():
    for name in WHERE:
        path = ROOT / name
        if path.is_file():
            yield path
            continue
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix not in SKIP_SUFFIXES and "__pycache__" not in f.parts:
                yield f


def matches(text: str) -> list[str]:
    return [m.group(0) for m in PATTERN.finditer(text)]


def test_the_pattern_finds_what_it_is_for():
    # each alternative once, so a typo in PATTERN cannot pass the tree vacuously
    # (the sample words are split in the source so that this file itself stays clean)
    found = matches("a " "Le" "nt machine; see ." "./shared/x; " "Re" "viewers said; " "Sess" "ion 4 notes")
    assert found == ["Le" "nt", "." "./shared", "Re" "view", "Sess" "ion 4"], found
    assert matches("silent, prelent, preview, sessions, session-wide") == []


def test_no_file_speaks_of_how_the_work_was_organised():
    hits = []
    for f in _files():
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue
        hits += [f"{f.relative_to(ROOT)}:{i}: {line.strip()[:120]}" for i, line in enumerate(lines, 1) if PATTERN.search(line)]
    assert not hits, "the project should describe glm5, not how its work was organised:\n" + "\n".join(hits)
