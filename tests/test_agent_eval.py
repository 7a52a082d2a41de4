"""`glm5 agent eval` end to end against the scripted endpoint: shipped suites' references pass their own
verifiers, every failure class is produced and named, a user's own suite folder works, task files are
validated, and a re-run continues instead of starting over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agent_helpers import run_scripted_suite, tool_names

from glm5.agent.client import ChatClient
from glm5.agent.eval.harness import run_suite
from glm5.agent.eval.metrics import FAILURE_CLASSES
from glm5.agent.eval.report import write_report
from glm5.agent.eval.tasks import load_suite, load_task, shipped_suites
from glm5.agent.loop import AgentConfig
from glm5.agent.scripted import ScriptedEndpoint, sabotage


def test_shipped_suites_load_and_every_task_has_a_reference():
    assert set(shipped_suites()) >= {"function-calling", "data", "write", "code", "abstain"}
    for name in shipped_suites():
        suite = load_suite(name)
        assert len(suite.tasks) >= 2, name
        for task in suite.tasks:
            assert task.reference, f"{name}/{task.id} has no reference solution"
    categories = {t.category for t in load_suite("function-calling").tasks}
    assert categories == {"simple", "multiple", "parallel", "parallel_multiple", "irrelevance"}
    abstain = load_suite("abstain").tasks
    assert sum(t.unanswerable for t in abstain) >= 4 and sum(not t.unanswerable for t in abstain) >= 4


@pytest.mark.parametrize("suite", ["function-calling", "data", "write", pytest.param("code", marks=pytest.mark.slow),
                                   "abstain"])
def test_reference_solutions_pass_their_verifiers_through_the_real_loop_and_tools(suite, tmp_path):
    used = {c["name"] for t in load_suite(suite).tasks for turn in t.reference for c in turn.get("tool_calls", [])}
    if suite != "function-calling" and not used <= tool_names():
        pytest.skip(f"needs the tools {sorted(used - tool_names())}")
    results, _ = run_scripted_suite(suite, tmp_path, k=1, config=AgentConfig(timeout_s=120, max_steps=15))
    failed = [(r["task"], r["failure"], r["first_error"]) for r in results["runs"] if not r["passed"] or r["errors"]]
    assert not failed  # a reference passes without a single error on the way
    assert results["overall"]["pass^k"] == 1.0


def test_function_calling_report_with_repeats(tmp_path):
    results, _ = run_scripted_suite("function-calling", tmp_path, k=3)
    o = results["overall"]
    assert o["runs"] == 30 and o["pass@1"] == o["pass@k"] == o["pass^k"] == 1.0 and o["pass^j"] == [1.0] * 3
    report = (tmp_path / "report.md").read_text() if (tmp_path / "report.md").exists() else write_report(results, tmp_path).read_text()
    assert "| pass@1 | pass@3 | pass^3 |" in report and "| 100.0% | 100.0% | 100.0% | 30 / 30 |" in report
    for png in ("reliability.png", "failures.png", "cost.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["k"] == 3 and len(saved["runs"]) == 30 and saved["categories"]["irrelevance"]["pass@1"] == 1.0


# ---- a user's own suite: every failure class, end to end ----------------------------------------------------
def make_user_suite(root: Path) -> Path:
    suite = root / "my-suite"
    (suite / "data").mkdir(parents=True)
    (suite / "data/numbers.txt").write_text("1\n2\n3\n4\n5\n")
    (suite / "data/blob.bin").write_bytes(b"\x00\x01binary")
    read = {"name": "read_file", "arguments": {"path": "inputs/numbers.txt"}}
    (suite / "sum.json").write_text(json.dumps({
        "prompt": "Add up the numbers in numbers.txt. End with @total[N].", "mode": "write",
        "files": ["data/numbers.txt", "data/blob.bin"], "verify": {"type": "answer", "answers": {"total": 15}},
        "reference": [{"reasoning": "Read them.", "tool_calls": [read]}, {"content": "They add up to 15. @total[15]"}]}))
    (suite / "unknowable.json").write_text(json.dumps({
        "prompt": "What is the author's favourite colour, according to numbers.txt?", "mode": "write",
        "category": "unanswerable", "files": ["data/numbers.txt", "data/blob.bin"],
        "verify": {"type": "abstain", "answer": None},
        "reference": [{"tool_calls": [read]}, {"content": "ABSTAIN: the file only holds numbers."}]}))
    return suite


EXPECTED = {  # sabotage kind -> failure class of (sum, unknowable)
    "malformed_call": ("malformed_call", "malformed_call"),
    "unknown_tool": ("unknown_tool", "unknown_tool"),
    "bad_arguments": ("bad_arguments", "bad_arguments"),
    "tool_error_unrecovered": ("tool_error_unrecovered", "tool_error_unrecovered"),
    "step_limit": ("step_limit", "step_limit"),
    "wrong_answer": ("wrong_answer", "fabricated"),
    "fabricated": ("wrong_answer", "fabricated"),
    "timeout": ("timeout", "timeout"),
    "endpoint_error": ("endpoint_error", "endpoint_error"),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_each_failure_class_from_scripted_runs(kind, tmp_path):
    suite = load_suite(make_user_suite(tmp_path))
    failing = {"name": "read_file", "arguments": {"path": "inputs/blob.bin"}}
    scripts = {t.prompt: sabotage(t.reference, kind, failing_call=failing, delay_s=3.0) for t in suite.tasks}
    with ScriptedEndpoint(scripts) as endpoint:
        results = run_suite(suite, ChatClient(endpoint.base_url, retries=0), tmp_path / "out", 2,
                            AgentConfig(timeout_s=1.0 if kind == "timeout" else 60, max_steps=4), progress=False)
    by_task = {t: {r["failure"] for r in results["runs"] if r["task"] == t} for t in ("sum", "unknowable")}
    assert by_task == {"sum": {EXPECTED[kind][0]}, "unknowable": {EXPECTED[kind][1]}}
    assert results["overall"]["pass^k"] == 0.0
    assert sum(results["overall"]["failures"].values()) == 4
    report = write_report(results, tmp_path / "out").read_text()
    if kind == "tool_error_unrecovered":  # the tool-use table counts the failing calls per tool
        assert "| `read_file` | 4 | 4 |" in report and "tool_error 4" in report
    for cls in set(EXPECTED[kind]):
        assert f"| `{cls}` | {sum(r['failure'] == cls for r in results['runs'])} |" in report
        assert f"- **{cls}**: task" in report


def test_wrong_abstention_and_simpleqa_grades(tmp_path):
    suite = load_suite(make_user_suite(tmp_path))
    scripts = {t.prompt: sabotage(t.reference, "wrong_abstention") for t in suite.tasks}
    with ScriptedEndpoint(scripts) as endpoint:
        results = run_suite(suite, ChatClient(endpoint.base_url), tmp_path / "out", 2, AgentConfig(), progress=False)
    failures = {r["task"]: r["failure"] for r in results["runs"]}
    assert failures == {"sum": "wrong_abstention", "unknowable": None}
    assert results["overall"]["simpleqa"]["correct"] == 2 and results["overall"]["simpleqa"]["not_attempted"] == 0
    assert results["overall"]["pass@1"] == 0.5


def test_recovered_tool_error_passes_and_flaky_tasks_show_in_pass_hat_k(tmp_path):
    suite = load_suite(make_user_suite(tmp_path))
    sum_task = next(t for t in suite.tasks if t.id == "sum")
    failing = {"name": "read_file", "arguments": {"path": "inputs/blob.bin"}}
    calls = []

    def policy(body):  # runs alternate: recover from a tool error and pass / answer wrong
        first_user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        if first_user != sum_task.prompt:
            return {"content": "ABSTAIN: no colour in there."}
        step = sum(m["role"] == "assistant" for m in body["messages"])
        if step == 0:
            calls.append(1)
        good = len(calls) % 2 == 1
        script = [{"tool_calls": [failing]}, *sum_task.reference] if good else sabotage(sum_task.reference, "wrong_answer")
        return script[step] if step < len(script) else {"content": "end"}

    with ScriptedEndpoint(policy=policy) as endpoint:
        results = run_suite(suite, ChatClient(endpoint.base_url), tmp_path / "out", 4, AgentConfig(), progress=False)
    task = next(t for t in results["tasks"] if t["task"] == "sum")
    assert (task["n"], task["c"]) == (4, 2) and task["failures"] == {"wrong_answer": 2}
    assert task["pass@1"] == 0.5 and task["pass@k"] == 1.0 and task["pass^k"] == 0.0
    assert task["pass^j"] == pytest.approx([0.5, 1 / 6, 0.0, 0.0])
    passed = [r for r in results["runs"] if r["task"] == "sum" and r["passed"]]
    assert all(r["errors"] == 1 for r in passed)   # the tool error happened, and was recovered from


def test_rerunning_an_eval_continues_from_the_traces(tmp_path):
    suite = load_suite(make_user_suite(tmp_path))
    scripts = {t.prompt: t.reference for t in suite.tasks}
    with ScriptedEndpoint(scripts) as endpoint:
        first = run_suite(suite, ChatClient(endpoint.base_url), tmp_path / "out", 2, AgentConfig(), progress=False)
        asked = len(endpoint.requests)
        again = run_suite(suite, ChatClient(endpoint.base_url), tmp_path / "out", 2, AgentConfig(), progress=False)
        assert len(endpoint.requests) == asked  # finished runs are read back, not run again
    assert [r["passed"] for r in first["runs"]] == [r["passed"] for r in again["runs"]] == [True] * 4
    # a run killed before its first event was whole starts again instead of stopping the eval
    (tmp_path / "out/runs/sum/1/trace.jsonl").write_text('{"type": "sta')
    with ScriptedEndpoint(scripts) as endpoint:
        third = run_suite(suite, ChatClient(endpoint.base_url), tmp_path / "out", 2, AgentConfig(), progress=False)
        assert len(endpoint.requests) == 2   # only that run was redone
    assert [r["passed"] for r in third["runs"]] == [True] * 4


# ---- task validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "x", "verify": {"type": "answer", "answers": {"a": 1}}, "colour": 1}', "unknown key"),
    ('{"verify": {"type": "answer", "answers": {"a": 1}}}', "'prompt'"),
    ('{"prompt": "x"}', "'verify' is required"),
    ('{"prompt": "x", "verify": {"type": "vibes"}}', "'type' among"),
    ('{"prompt": "x", "verify": {"type": "answer"}}', "'answers'"),
    ('{"prompt": "x", "files": ["nope.csv"], "verify": {"type": "answer", "answers": {"a": 1}}}', "not found"),
    ('{"prompt": "x", "mode": "chaos", "verify": {"type": "answer", "answers": {"a": 1}}}', "'mode'"),
    ('{"prompt": "x", "verify": {"type": "abstain"}}', "'answer'"),
    ('{"prompt": "x", "verify": {"type": "file", "path": "outputs/x", "kind": "gif"}}', "'kind'"),
    ('{"prompt": "x", "verify": {"type": "tests", "tests": "hidden/"}}', "hidden tests"),
    ('{"prompt": "x", "max_steps": 0, "verify": {"type": "answer", "answers": {"a": 1}}}', "max_steps"),
])
def test_bad_task_files_get_one_line_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "task.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_task(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_suite_errors(tmp_path):
    with pytest.raises(ValueError, match="shipped suites are"):
        load_suite("no-such-suite")
    with pytest.raises(ValueError, match="no \\*.json task files"):
        load_suite(tmp_path)
    task = {"id": "same", "prompt": "x", "verify": {"type": "answer", "answers": {"a": 1}}}
    (tmp_path / "a.json").write_text(json.dumps(task))
    (tmp_path / "b.json").write_text(json.dumps(task))
    with pytest.raises(ValueError, match="appears twice"):
        load_suite(tmp_path)


def test_failure_classes_are_the_documented_ones():
    assert FAILURE_CLASSES[:9] == ("malformed_call", "unknown_tool", "bad_arguments", "tool_error_unrecovered",
                                   "step_limit", "wrong_answer", "fabricated", "wrong_abstention", "timeout")


@pytest.mark.slow
def test_code_task_without_the_fix_fails_its_hidden_tests(tmp_path):
    if not {"shell", "read_file"} <= tool_names():
        pytest.skip("needs the shell tool")
    suite = load_suite("code")
    task = next(t for t in suite.tasks if t.id == "fix-median")
    unfixed = [turn for turn in task.reference if not any(c["name"] == "write_file" for c in turn.get("tool_calls", []))]
    with ScriptedEndpoint({task.prompt: unfixed}) as endpoint:
        results = run_suite(suite, ChatClient(endpoint.base_url), tmp_path, 1, AgentConfig(timeout_s=120), progress=False,
                            tasks=["fix-median"])
    run = results["runs"][0]
    assert (run["passed"], run["failure"]) == (False, "wrong_answer")
    assert run["detail"].startswith("hidden tests failed") and "failed" in run["detail"]


def test_concurrent_runs_give_the_same_results_in_the_same_order(tmp_path):
    suite = load_suite(make_user_suite(tmp_path))
    failing = {"name": "read_file", "arguments": {"path": "inputs/blob.bin"}}
    scripts = {suite.tasks[0].prompt: suite.tasks[0].reference,
               suite.tasks[1].prompt: sabotage(suite.tasks[1].reference, "tool_error_unrecovered", failing_call=failing)}
    with ScriptedEndpoint(scripts) as endpoint:
        one = run_suite(suite, ChatClient(endpoint.base_url), tmp_path / "a", 3, AgentConfig(), progress=False)
        four = run_suite(suite, ChatClient(endpoint.base_url), tmp_path / "b", 3, AgentConfig(), progress=False,
                         concurrency=4)
    key = [(r["task"], r["run"], r["passed"], r["failure"]) for r in one["runs"]]
    assert key == [(r["task"], r["run"], r["passed"], r["failure"]) for r in four["runs"]]
    assert [k[3] for k in key] == [None] * 3 + ["tool_error_unrecovered"] * 3
    assert four["overall"]["pass^k"] == one["overall"]["pass^k"] == 0.5
    assert json.loads((tmp_path / "b/results.json").read_text())["runs"] == four["runs"]


def test_check_references_finds_a_reference_its_verifier_rejects(tmp_path, capsys):
    from glm5.cli import main

    suite = make_user_suite(tmp_path)
    assert main(["agent", "eval", "--suite", str(suite), "--out", str(tmp_path / "ok"), "--check-references"]) == 0
    assert "2 of 2 reference solutions pass" in capsys.readouterr().out
    task = json.loads((suite / "sum.json").read_text())
    task["reference"][-1]["content"] = "They add up to 16. @total[16]"
    (suite / "sum.json").write_text(json.dumps(task))
    assert main(["agent", "eval", "--suite", str(suite), "--out", str(tmp_path / "bad"), "--check-references"]) == 1
    out = capsys.readouterr().out
    assert "my-suite/sum: the reference does not pass cleanly: wrong_answer: @total[16], expected 15" in out
