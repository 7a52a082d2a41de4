"""Shared pieces of the agent tests: the scripted endpoint around a suite, and run helpers."""

from __future__ import annotations

from pathlib import Path

from glm5.agent.client import ChatClient
from glm5.agent.eval.harness import run_suite
from glm5.agent.eval.tasks import load_suite
from glm5.agent.loop import AgentConfig
from glm5.agent.scripted import ScriptedEndpoint, sabotage


def tool_names() -> set[str]:
    from glm5.agent.tools import all_tools

    return {t.name for t in all_tools()}


def run_scripted_suite(suite_name: str, out: Path, k: int = 1, kind: str | None = None, tasks=None,
                       config: AgentConfig | None = None, failing_call: dict | None = None):
    """Run a suite against the scripted endpoint replaying each task's reference (or a sabotaged one)."""
    suite = load_suite(suite_name)
    scripts = {}
    for t in suite.tasks:
        if tasks and t.id not in tasks:
            continue
        scripts[t.prompt] = sabotage(t.reference, kind, failing_call=failing_call, delay_s=3.0) if kind else t.reference
    with ScriptedEndpoint(scripts) as endpoint:
        results = run_suite(suite, ChatClient(endpoint.base_url), out, k,
                            config or AgentConfig(timeout_s=60, max_steps=6, unsafe_no_sandbox=False),
                            progress=False, tasks=tasks)
    return results, endpoint
