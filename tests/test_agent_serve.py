"""The agent and the harness against the real `glm5 serve` (nano preset, random weights): the model fails,
and the harness must say how. Also `glm5 agent run` starting and stopping its own server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import running_server

from glm5.agent.client import ChatClient
from glm5.agent.eval.harness import run_suite
from glm5.agent.eval.metrics import FAILURE_CLASSES
from glm5.agent.eval.report import write_report
from glm5.agent.eval.tasks import load_suite
from glm5.agent.loop import AgentConfig
from glm5.cli import main


@pytest.mark.slow
def test_random_weights_fail_and_every_failure_is_classified(tmp_path):
    with running_server(["--preset", "nano", "--seed", "1"]) as (base_url, _):
        suite = load_suite("function-calling")
        tasks = ["simple-weather", "parallel-stocks", "irrelevance-capital"]
        results = run_suite(suite, ChatClient(base_url), tmp_path, 2,
                            AgentConfig(max_tokens=24, max_steps=2, timeout_s=120), progress=False, tasks=tasks)
        # the same through the CLI, on a multi-turn suite: the data tools and their errors
        code = main(["agent", "eval", "--suite", "data", "--task", "total-revenue", "-k", "2", "--out",
                     str(tmp_path / "cli"), "--base-url", base_url, "--max-tokens", "24", "--max-steps", "3"])
    assert code == 0
    for res in (results, json.loads((tmp_path / "cli/results.json").read_text())):
        runs = res["runs"]
        assert runs and all(r["steps"] >= 1 and r["prompt_tokens"] > 0 for r in runs)  # the model was really called
        failed = [r for r in runs if not r["passed"]]
        assert all(r["failure"] in FAILURE_CLASSES and r["failure"] != "endpoint_error" for r in failed)
        assert sum(res["overall"]["failures"].values()) == len(failed)
        assert res["model"] == "nano"
    # irrelevance passes only when the model makes no call; the parallel task cannot pass by chance
    assert not any(r["passed"] for r in results["runs"] if r["task"] == "parallel-stocks")
    report = write_report(results, tmp_path).read_text()
    assert "## Failures by their first error" in report and "on `nano`" in report
    for cls, count in results["overall"]["failures"].items():
        assert f"| `{cls}` | {count} |" in report
    assert (tmp_path / "cli/report.md").exists() and (tmp_path / "cli/reliability.png").exists()


def _port_open(url: str) -> bool:
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


@pytest.mark.slow
def test_agent_run_starts_glm5_serve_and_stops_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    workdir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "glm5.cli", "agent", "run", "What is 2 + 2?", "--workdir", str(workdir),
                           "--max-steps", "2", "--max-tokens", "16", "--mode", "research"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "starting glm5 serve --preset nano" in done.stderr, done.stderr
    events = [json.loads(line) for line in (workdir / "trace.jsonl").read_text().splitlines()]
    assert events[0]["type"] == "start" and events[-1]["type"] == "final"
    assert any(e["type"] == "model_call" for e in events)
    assert done.returncode in (0, 1) and f"trace {workdir / 'trace.jsonl'}" in done.stderr
    assert not _port_open(events[0]["base_url"])   # the child server is gone
    assert (workdir / "serve.log").exists()


@pytest.mark.slow
def test_ctrl_c_stops_the_server_it_started_and_leaves_a_resumable_trace(tmp_path):
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    workdir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "glm5.cli", "agent", "run", "Tell me a long story.", "--workdir",
                                str(workdir), "--max-tokens", "1500", "--mode", "research"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # a suite started in the background of a non-interactive shell (`nohup make test &`)
                               # ignores SIGINT, and an ignored signal stays ignored across exec: Python then installs
                               # no KeyboardInterrupt handler. The run gets Ctrl-C's default back.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    trace = workdir / "trace.jsonl"
    deadline = time.monotonic() + 240
    while not (trace.exists() and trace.read_text().strip()):   # the server is up and the first call is out
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err, f"exit status {process.returncode}:\n{err[-3000:]}"
    start = json.loads(trace.read_text().splitlines()[0])
    assert not _port_open(start["base_url"])                    # the child server was stopped
    assert not any(json.loads(line)["type"] == "final" for line in trace.read_text().splitlines())   # resumable
