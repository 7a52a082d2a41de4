"""Every Python and shell snippet of README.md runs as written, on small inputs, so a snippet that drifts from
the code fails here. Also: README.md quotes the demo's duration that bench/results/demo.json records.

    python -m pytest tests/test_readme.py -q

How the snippets run. The fenced ```python and ```bash blocks run in README order in one scratch folder
(python blocks as scripts, bash blocks as `bash -e` scripts), where `glm5`, `.venv/bin/glm5` and
`.venv/bin/python` run this checkout, and the files the README names exist at toy size: corpus.txt,
corpus.jsonl (pretraining records, "text"), chats.jsonl (SFT records, "messages"), ckpt/ (a nano model) and
runs/latest/model (a nano model with its tokenizer, what `make demo` leaves). HTML comments right above a
block (invisible when the README is rendered) adjust the run:

    <!-- readme-test: long-running: REASON -->      the block is skipped; REASON shows in the test report
    <!-- readme-test: skip-line TEXT: REASON -->    lines containing TEXT are left out (a server, a benchmark)
    <!-- readme-test: replace OLD => NEW -->        OLD becomes NEW in the test run only (sizes, step counts)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- readme-test: (long-running|skip-line|replace):? (.*) -->$")


def readme_blocks(text: str) -> list[dict]:
    """The README's python / bash blocks, each with its first line number and its markers applied."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(python|bash)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start = i
        j = i + 1
        while lines[j] != "```":
            j += 1
        block = {"lang": fence.group(1), "line": start + 1, "code": lines[start + 1 : j], "skip": None,
                 "skip_lines": [], "replace": []}
        k = start - 1
        while k >= 0 and lines[k].startswith("<!-- readme-test:"):  # the markers right above the fence
            m = MARKER.match(lines[k])
            if not m:
                raise ValueError(f"README.md:{k + 1}: malformed readme-test marker: {lines[k]}")
            kind, rest = m.groups()
            if kind == "long-running":
                block["skip"] = rest
            elif kind == "skip-line":
                needle, _, reason = rest.partition(": ")
                block["skip_lines"].append((needle, reason))
            else:
                old, sep, new = rest.partition(" => ")
                if not sep:
                    raise ValueError(f"README.md:{k + 1}: replace needs 'OLD => NEW'")
                block["replace"].append((old, new))
            k -= 1
        blocks.append(block)
        i = j + 1
    return blocks


def runnable(block: dict) -> str:
    code = [line for line in block["code"] if not any(needle in line for needle, _ in block["skip_lines"])]
    text = "\n".join(code) + "\n"
    for old, new in block["replace"]:
        if old not in text:
            raise AssertionError(f"README.md:{block['line']}: marker replaces {old!r}, which the block does not contain")
        text = text.replace(old, new)
    return text


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    import torch

    from glm5 import GLM5Config, GLM5ForCausalLM
    from glm5.tokenizer import default_tokenizer

    box = tmp_path_factory.mktemp("readme")
    bin_dir = box / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "glm5").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m glm5.cli "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    text = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)]
    (box / "corpus.txt").write_text("".join(text))
    with open(box / "corpus.jsonl", "w") as fh:
        for i in range(0, 300, 3):
            fh.write(json.dumps({"text": "".join(text[i : i + 3])}) + "\n")
    with open(box / "chats.jsonl", "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus 1?"},
                                              {"role": "assistant", "content": f"{i + 1}"}]}) + "\n")
    torch.manual_seed(0)
    model = GLM5ForCausalLM(GLM5Config.from_preset("nano"))
    model.save_pretrained(box / "ckpt")
    model.save_pretrained(box / "runs" / "latest" / "model")
    default_tokenizer().save(box / "runs" / "latest" / "model")
    return box


def run_in(box: Path, block: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{box / '.venv' / 'bin'}:{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    code = runnable(block)
    cmd = [sys.executable, "-c", code] if block["lang"] == "python" else ["bash", "-e", "-c", code]
    return subprocess.run(cmd, cwd=box, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # about a minute of CPU: a dozen subprocesses that each import torch
@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b['line']}-{b['lang']}" for b in BLOCKS])
def test_readme_snippet_runs(block, sandbox):
    if block["skip"]:
        pytest.skip(f"README.md:{block['line']}: {block['skip']}")
    if not runnable(block).strip():
        pytest.skip(f"README.md:{block['line']}: every line is marked: " + "; ".join(r for _, r in block["skip_lines"]))
    done = run_in(sandbox, block)
    assert done.returncode == 0, (f"README.md:{block['line']} ({block['lang']}) failed:\n{runnable(block)}\n"
                                  f"--- stderr ---\n{done.stderr[-3000:]}")


def test_the_markers_are_read_and_a_drifted_snippet_fails(sandbox):
    text = ("<!-- readme-test: replace 500 => 2 -->\n<!-- readme-test: skip-line serve: a server -->\n```bash\n"
            "echo steps 500\nglm5 serve --port 1\n```\n\n<!-- readme-test: long-running: minutes -->\n```python\nx\n```\n"
            "```python\nimport glm5\nglm5.GLM5Config.from_preset('no-such-preset')\n```\n")
    shell, slow, drifted = readme_blocks(text)
    assert runnable(shell) == "echo steps 2\n" and slow["skip"] == "minutes"
    assert run_in(sandbox, shell).stdout == "steps 2\n"
    assert run_in(sandbox, drifted).returncode != 0


def test_readme_quotes_the_measured_demo_duration():
    measured = json.loads((ROOT / "bench" / "results" / "demo.json").read_text())["wall_minutes"]
    readme = README.read_text(encoding="utf-8")
    quoted = {float(m) for m in re.findall(r"(\d+(?:\.\d+)?) min(?:utes)?\b[^|\n]*?(?:2 cores|2-core machine)", readme)}
    quoted |= {float(m) for m in re.findall(r"2-core machine[^)\n]*?(\d+(?:\.\d+)?) min\b", readme)}
    assert quoted == {measured}, f"README quotes the demo at {sorted(quoted)} min; bench/results/demo.json says {measured}"
    demo_py = (ROOT / "glm5" / "demo.py").read_text(encoding="utf-8")
    assert not re.search(r"about \w+ minutes", demo_py + readme), "a second, unmeasured duration"
