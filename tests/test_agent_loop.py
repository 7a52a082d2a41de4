"""The agent loop end to end against the scripted OpenAI-compatible endpoint, with the real file tools:
interleaved reasoning, the trace, errors sent back to the model, limits, abstention, context, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glm5.agent.client import ChatClient
from glm5.agent.context import fit_context
from glm5.agent.loop import AgentConfig, is_abstention, resume_agent, run_agent
from glm5.agent.scripted import ScriptedEndpoint
from glm5.agent.tools import all_tools
from glm5.agent.tools.base import Tool, ToolResult
from glm5.agent.trace import read_trace

TASK = "Write hello into outputs/a.txt, read it back, then answer."


def file_tools():
    return [t for t in all_tools() if t.name in ("read_file", "write_file", "list_files")]


def run(tmp_path, turns, config=None, tools=(), task=TASK):
    with ScriptedEndpoint({task: turns}) as endpoint:
        result = run_agent(task, tmp_path / "run", ChatClient(endpoint.base_url), config or AgentConfig(max_steps=8),
                           tools=file_tools() if tools == () else tools)
    return result, endpoint, read_trace(tmp_path / "run" / "trace.jsonl")


GOOD = [
    {"reasoning": "R1: write the file first.",
     "tool_calls": [{"name": "write_file", "arguments": {"path": "outputs/a.txt", "content": "hello"}}]},
    {"reasoning": "R2: now read it back.", "tool_calls": [{"name": "read_file", "arguments": {"path": "outputs/a.txt"}}]},
    {"reasoning": "R3: done.", "content": "The file says hello."},
]


def test_reasoning_goes_back_with_the_history_and_the_trace_has_every_event(tmp_path):
    result, endpoint, events = run(tmp_path, GOOD)
    assert result.status == "answered" and result.answer == "The file says hello." and not result.abstained
    assert (tmp_path / "run/outputs/a.txt").read_text() == "hello"
    assert result.outputs == ["a.txt"]
    # interleaved thinking: the 3rd request carries both earlier turns' reasoning as reasoning_content
    history = endpoint.requests[2]["messages"]
    reasoning = [m.get("reasoning_content") for m in history if m["role"] == "assistant"]
    assert reasoning == ["R1: write the file first.", "R2: now read it back."]
    tool_messages = [m for m in history if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["call_0_0", "call_1_0"]
    assert "hello" in tool_messages[1]["content"]
    assert [e["type"] for e in events] == ["start", "model_call", "tool_call", "tool_result", "model_call", "tool_call",
                                           "tool_result", "model_call", "final"]
    calls = [e for e in events if e["type"] == "model_call"]
    assert all(e["prompt_tokens"] > 0 and e["completion_tokens"] > 0 and e["seconds"] >= 0 for e in calls)
    final = events[-1]
    assert final["steps"] == 3 and final["prompt_tokens"] == sum(e["prompt_tokens"] for e in calls)
    assert final["abstained"] is False
    # the tool schemas went out with every request
    assert {t["function"]["name"] for t in endpoint.requests[0]["tools"]} == {"read_file", "write_file", "list_files"}


class Exploding(Tool):
    name = "explode"
    description = "Raises."
    parameters = {"type": "object", "properties": {}}

    def run(self, arguments, ctx):
        raise RuntimeError("boom")


class Failing(Tool):
    name = "fail"
    description = "Fails."
    parameters = {"type": "object", "properties": {}}

    def run(self, arguments, ctx):
        return ToolResult("it did not work", ok=False)


def test_malformed_output_goes_back_to_the_model_as_errors_and_the_run_goes_on(tmp_path):
    turns = [
        {"tool_calls": [{"name": "write_file", "arguments": '{"path": "outputs/a.txt", "content": '}]},  # cut JSON
        {"tool_calls": [{"name": "no_such_tool", "arguments": {}}]},
        {"tool_calls": [{"name": "write_file", "arguments": {"path": "outputs/a.txt"}}]},  # content missing
        {"tool_calls": [{"name": "write_file", "arguments": "[1, 2]"}]},                   # not an object
        {"tool_calls": [{"name": "read_file", "arguments": {"path": "../../etc/passwd"}}]},  # outside the workdir
        {"tool_calls": [{"name": "explode", "arguments": {}}, {"name": "fail", "arguments": {}}]},
        {"content": "<tool_call>read_file<arg_key>path</arg_key>"},                        # unparsed call syntax
        {"content": "Gave up politely."},
    ]
    result, endpoint, events = run(tmp_path, turns, AgentConfig(max_steps=10), tools=file_tools() + [Exploding(), Failing()])
    assert result.status == "answered" and result.answer == "Gave up politely."
    kinds = [e["kind"] for e in events if e["type"] == "error"]
    assert kinds == ["malformed_call", "unknown_tool", "bad_arguments", "bad_arguments", "bad_arguments", "tool_error",
                     "tool_error", "malformed_call"]
    # each error reached the model in the next request
    last = endpoint.requests[-1]["messages"]
    tool_texts = [m["content"] for m in last if m["role"] == "tool"]
    assert tool_texts[0].startswith("ERROR (malformed_call)") and "not valid JSON" in tool_texts[0]
    assert tool_texts[1].startswith("ERROR (unknown_tool)") and "read_file" in tool_texts[1]
    assert tool_texts[2].startswith("ERROR (bad_arguments)") and "content" in tool_texts[2]
    assert "RuntimeError: boom" in tool_texts[5] and tool_texts[6] == "ERROR (tool_error): it did not work"
    assert last[-1]["role"] == "user" and "could not parse" in last[-1]["content"]
    assert not (tmp_path / "etc").exists()


def test_step_limit_timeout_and_endpoint_errors_end_the_run_with_their_status(tmp_path):
    loop = [{"tool_calls": [{"name": "list_files", "arguments": {}}]}] * 50
    result, _, events = run(tmp_path / "a", loop, AgentConfig(max_steps=3))
    assert result.status == "step_limit" and result.steps == 3
    assert events[-2]["type"] == "error" and events[-2]["kind"] == "step_limit"

    result, _, events = run(tmp_path / "b", [{"content": "late", "delay_s": 5}], AgentConfig(timeout_s=1.0))
    assert result.status == "timeout" and result.steps == 0
    assert [e["kind"] for e in events if e["type"] == "error"] == ["timeout"]

    result, endpoint, events = run(tmp_path / "c", [{"status": 500}])
    assert result.status == "model_error" and len(endpoint.requests) == 3   # two retries, then it gives up
    assert "HTTP 500" in [e for e in events if e["type"] == "error"][0]["message"]

    result, endpoint, events = run(tmp_path / "d", [{"status": 400}])   # a client error is not retried
    assert result.status == "model_error" and len(endpoint.requests) == 1


def test_a_rate_limited_call_is_retried(tmp_path):
    answers = iter([{"status": 429}, {"content": "fine now"}])
    with ScriptedEndpoint(policy=lambda body: next(answers)) as endpoint:
        result = run_agent(TASK, tmp_path / "run", ChatClient(endpoint.base_url), AgentConfig(), tools=[])
    assert result.status == "answered" and result.answer == "fine now" and len(endpoint.requests) == 2
    assert not [e for e in read_trace(tmp_path / "run/trace.jsonl") if e["type"] == "error"]


@pytest.mark.parametrize("answer, abstains", [
    ("ABSTAIN: the documents do not say.", True),
    ("[ABSTAIN] not in the sources", True),
    ("**Abstain:** nothing found", True),
    ("  abstain - no data", True),
    ("Abstained: insufficient evidence", True),
    ("The answer is 42.", False),
    ("I would not abstain here: it is 42.", False),
    ("Abstinence rates rose 4%.", False),
    ("I cannot answer this from the documents.", True),
    ("I don't know.", True),
    ("The documents do not mention a US office.", True),
    ("**There is no information** about scope 3.", True),
    ("The documents say revenue was 38.6 million EUR; I cannot answer for 2026.", False),   # an answer first
    ("I can answer: 2009.", False),
    ("There is no doubt: 2009.", False),
])
def test_abstention_marker_in_any_common_formatting(answer, abstains):
    assert is_abstention(answer) is abstains


def test_an_abstaining_answer_is_marked_in_the_trace(tmp_path):
    result, _, events = run(tmp_path, [{"content": "ABSTAIN: nothing I read answers this."}])
    assert result.status == "abstained" and result.abstained
    assert events[-1]["abstained"] is True and events[-1]["status"] == "abstained"


def test_context_budget_shortens_old_tool_results_and_keeps_the_latest(tmp_path):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    for k in range(3):
        messages += [{"role": "assistant", "content": "", "tool_calls": [{"id": f"c{k}"}]},
                     {"role": "tool", "tool_call_id": f"c{k}", "content": f"{k}" * 8000}]
    view, changed = fit_context(messages, budget_tokens=3000)
    assert changed == 2 and view[-1] == messages[-1]            # the latest result in full
    assert len(view[3]["content"]) < 600 and "shortened" in view[3]["content"]
    assert messages[3]["content"] == "0" * 8000                  # the conversation itself is untouched
    view, changed = fit_context(messages, budget_tokens=2100)    # tighter: the oldest is dropped outright
    assert "dropped" in view[3]["content"] and changed == 2
    assert fit_context(messages, budget_tokens=100_000) == (messages, 0)

    big = "x" * 20_000
    turns = [{"tool_calls": [{"name": "write_file", "arguments": {"path": "outputs/big.txt", "content": big}}]},
             {"tool_calls": [{"name": "read_file", "arguments": {"path": "outputs/big.txt"}}]},
             {"tool_calls": [{"name": "list_files", "arguments": {}}]},
             {"content": "done"}]
    result, endpoint, events = run(tmp_path, turns, AgentConfig(context_tokens=2000))
    sent = [m for m in endpoint.requests[-1]["messages"] if m["role"] == "tool"]
    assert "older tool result" in sent[1]["content"] and len(sent[1]["content"]) < 1000
    full = [e for e in events if e["type"] == "tool_result"][1]["message"]["content"]
    assert "x" * 10_000 in full                                  # the trace keeps what the tool returned
    assert [e for e in events if e["type"] == "model_call"][-1]["compacted"] >= 1


def test_resume_reruns_tool_calls_a_kill_left_without_result(tmp_path):
    with ScriptedEndpoint({TASK: GOOD}) as endpoint:
        client = ChatClient(endpoint.base_url)
        result = run_agent(TASK, tmp_path / "run", client, AgentConfig(), tools=file_tools())
        trace = tmp_path / "run/trace.jsonl"
        lines = trace.read_text().splitlines()
        # cut the trace after the first tool_call (as a kill during the tool would), half a line included
        cut = next(i for i, ln in enumerate(lines) if json.loads(ln)["type"] == "tool_call")
        trace.write_text("\n".join(lines[:cut + 1]) + "\n" + lines[cut + 1][:20])
        (tmp_path / "run/outputs/a.txt").unlink()
        resumed = resume_agent(tmp_path / "run", client, tools=file_tools())
    assert result.status == resumed.status == "answered" and resumed.answer == result.answer
    assert (tmp_path / "run/outputs/a.txt").read_text() == "hello"   # the pending write_file ran again
    events = read_trace(trace)
    assert [e["type"] for e in events].count("resume") == 1 and resumed.steps == 3


@pytest.mark.slow
def test_a_killed_cli_run_resumes_from_its_trace(tmp_path):
    """`glm5 agent run` in a subprocess, killed while waiting on the model; `--resume DIR` finishes it."""
    seen = []

    def policy(body):
        step = sum(m["role"] == "assistant" for m in body["messages"])
        seen.append(step)
        turn = dict(GOOD[step]) if step < len(GOOD) else {"content": "end"}
        if step == 1 and seen.count(1) == 1:
            turn["delay_s"] = 60  # the first time only: the run is killed while it waits
        return turn

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    workdir = tmp_path / "run"
    with ScriptedEndpoint(policy=policy) as endpoint:
        command = [sys.executable, "-m", "glm5.cli", "agent", "run", TASK, "--base-url", endpoint.base_url,
                   "--workdir", str(workdir), "--mode", "write", "--max-steps", "6"]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while 1 not in seen:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never reached its second model call"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        events = read_trace(workdir / "trace.jsonl")
        assert [e["type"] for e in events] == ["start", "model_call", "tool_call", "tool_result"]
        assert (workdir / "outputs/a.txt").read_text() == "hello"
        done = subprocess.run([sys.executable, "-m", "glm5.cli", "agent", "run", "--resume", str(workdir),
                               "--base-url", endpoint.base_url], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "The file says hello." in done.stdout and "answered after 3 model call(s)" in done.stderr
    events = read_trace(workdir / "trace.jsonl")
    types = [e["type"] for e in events]
    assert types[4] == "resume" and types[-1] == "final" and types.count("model_call") == 3
    # the resumed conversation carried the first turn (its reasoning included) to the endpoint
    after = endpoint.requests[-1]["messages"]
    assert [m.get("reasoning_content") for m in after if m["role"] == "assistant"][0] == "R1: write the file first."
    assert after[0]["role"] == "system" and after[1] == {"role": "user", "content": TASK}


def test_a_workdir_that_holds_a_run_is_not_overwritten(tmp_path):
    run(tmp_path, [{"content": "hi"}])
    with pytest.raises(ValueError, match="already holds a run"):
        run_agent(TASK, tmp_path / "run", ChatClient("http://127.0.0.1:9"), AgentConfig(), tools=[])


def test_agent_run_offers_and_calls_an_mcp_servers_tools(tmp_path, capsys):
    from glm5.cli import main

    server = Path(__file__).parent / "data" / "mcp_demo_server.py"
    task = "Add 2 and 3 with the add tool."
    turns = [{"reasoning": "Use the server's tool.", "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]},
             {"content": "2 + 3 = 5"}]
    with ScriptedEndpoint({task: turns}) as endpoint:
        code = main(["agent", "run", task, "--base-url", endpoint.base_url, "--workdir", str(tmp_path / "run"),
                     "--mode", "research", "--mcp", f"{sys.executable} {server}"])
    captured = capsys.readouterr()
    assert code == 0 and "2 + 3 = 5" in captured.out
    assert "step 1: model" in captured.err and "calls add" in captured.err and "  add ok" in captured.err  # progress
    offered = {t["function"]["name"] for t in endpoint.requests[0]["tools"]}
    assert {"add", "search", "open"} <= offered
    result = next(e for e in read_trace(tmp_path / "run/trace.jsonl") if e["type"] == "tool_result")
    assert result["ok"] and result["message"]["content"].strip() == "5"


def test_cli_errors_are_one_line(tmp_path, capsys):
    from glm5.cli import main

    code = main(["agent", "run", "hi", "--base-url", "http://127.0.0.1:9", "--workdir", str(tmp_path / "a"),
                 "--mode", "research", "--mcp", f"{sys.executable} -c 'raise SystemExit(3)'"])
    err = capsys.readouterr().err
    assert code == 2 and "glm5 agent run: error:" in err and "Traceback" not in err
    assert main(["agent", "run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["agent", "run", "hi", "--files", str(tmp_path / "missing.csv"), "--workdir", str(tmp_path / "c")]) == 2
    assert "--files" in capsys.readouterr().err and not (tmp_path / "c").exists()   # no server was started
    assert main(["agent", "eval", "--suite", "no-such-suite", "--out", str(tmp_path / "o")]) == 2
    assert "shipped suites are" in capsys.readouterr().err
    # an endpoint that is not there: the run ends as model_error with the reason in the trace, exit code 1
    assert main(["agent", "run", "hi", "--base-url", "http://127.0.0.1:9", "--workdir", str(tmp_path / "b"),
                 "--mode", "research"]) == 1
    final = read_trace(tmp_path / "b/trace.jsonl")[-1]
    assert final["status"] == "model_error"


def test_a_tool_call_cannot_outlive_the_run(tmp_path):
    turns = [{"tool_calls": [{"name": "python", "arguments": {"code": "import time\ntime.sleep(60)"}}]},
             {"content": "never reached"}]
    result, _, events = run(tmp_path, turns, AgentConfig(mode="code", timeout_s=3.0, tool_timeout_s=60.0), tools=None)
    assert result.status == "timeout"
    tool_result = next(e for e in events if e["type"] == "tool_result")
    import re

    limit = re.search(r"TIMED OUT after ([0-9.]+) s", tool_result["message"]["content"])
    assert limit and float(limit.group(1)) <= 3.0   # the tool's limit was the run's remaining time, not 60 s


def test_the_scripted_endpoint_speaks_openai_to_the_official_client():
    import openai

    turn = {"reasoning": "think", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1}}]}
    with ScriptedEndpoint({"q": [turn]}) as endpoint:
        client = openai.OpenAI(base_url=endpoint.base_url, api_key="none")
        reply = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "q"}])
        call = reply.choices[0].message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == ("add", {"a": 1})
        assert reply.choices[0].finish_reason == "tool_calls" and reply.usage.prompt_tokens > 0
        chunks = list(client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "q"}],
                                                     stream=True))
        deltas = [c.choices[0].delta for c in chunks]
        assert [d.model_extra.get("reasoning_content") for d in deltas if d.model_extra.get("reasoning_content")] == ["think"]
        assert [d.tool_calls[0].function.name for d in deltas if d.tool_calls] == ["add"]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_newest_model_is_the_latest_checkpoint_under_runs(tmp_path):
    from glm5.agent.local_server import newest_model, serve_command

    assert newest_model(tmp_path / "runs") is None
    for name, mtime in (("old", 1_000), ("new", 2_000), ("mid", 1_500)):
        (tmp_path / "runs" / name / "model").mkdir(parents=True)
        config = tmp_path / "runs" / name / "model" / "config.json"
        config.write_text("{}")
        os.utime(config, (mtime, mtime))
    (tmp_path / "runs/nomodel").mkdir()
    assert newest_model(tmp_path / "runs") == tmp_path / "runs/new/model"
    assert serve_command(8123, None)[-6:] == ["--preset", "nano", "--host", "127.0.0.1", "--port", "8123"]


def test_the_agent_never_imports_torch_the_model_or_the_engine():
    code = ("import sys\n"
            "import glm5.agent.loop, glm5.agent.cli, glm5.agent.eval.harness, glm5.agent.eval.report, "
            "glm5.agent.eval.verify, glm5.agent.scripted, glm5.agent.local_server, glm5.agent.tools\n"
            "print(sorted(m for m in ('torch', 'glm5.model', 'glm5.engine', 'glm5.serve') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
