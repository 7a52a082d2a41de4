"""`glm5 agent run` and `glm5 agent eval`.

    glm5 agent run "Plot monthly revenue from sales.csv and export it to xlsx" --files sales.csv --mode data
    glm5 agent run "..." --base-url http://127.0.0.1:8000 --model glm-5 --workdir runs/agent/1
    glm5 agent run --resume runs/agent/1                 # continue a killed run from its trace
    glm5 agent eval --suite function-calling -k 4 --out runs/agent-eval --base-url http://127.0.0.1:8000
    glm5 agent eval --suite path/to/my_suite -k 8 --out runs/my-eval       # your own tasks

Without --base-url, `glm5 serve` is started on a free loopback port with the newest runs/*/model (else the
nano preset's random weights) and stopped at the end, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path


def _add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    from glm5.common import int_at_least

    parser.add_argument("--base-url", default=None,
                        help="OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1); default: start glm5 serve")
    parser.add_argument("--model", default=None, help="model name to send (default: the endpoint's first model)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer token for a hosted endpoint (default: $OPENAI_API_KEY)")
    parser.add_argument("--serve-model", default=None,
                        help="checkpoint for the glm5 serve started without --base-url (default: newest runs/*/model)")
    parser.add_argument("--max-steps", type=int_at_least(1), default=None, help="model calls per run at most (default 20)")
    parser.add_argument("--max-tokens", type=int_at_least(1), default=None,
                        help="completion tokens per model call (default: the endpoint's, which fits its context)")
    parser.add_argument("--timeout", type=float, default=None, help="wall-time limit of a run in seconds (default 900)")
    parser.add_argument("--context-tokens", type=int_at_least(256), default=32_000,
                        help="history budget sent to the model (estimated tokens); older tool results are shortened past it")
    parser.add_argument("--tool-timeout", type=float, default=30.0, help="seconds per tool call (sandbox limit)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the endpoint's)")
    parser.add_argument("--mcp", action="extend", nargs="+", default=[], metavar="CMD",
                        help="start an MCP server with this command and offer its tools (repeatable)")
    parser.add_argument("--unsafe-no-sandbox", action="store_true",
                        help="run python/shell without the OS sandbox where it is unavailable (trusted tasks only)")


def register(subparsers) -> None:
    from glm5.common import int_at_least

    parser = subparsers.add_parser("agent", help="Agent Mode: run a task with tools, or evaluate reliability (pass^k)")
    sub = parser.add_subparsers(dest="agent_command", metavar="{run,eval}")
    run = sub.add_parser("run", help="run one task: tool calls against an endpoint, trace + deliverables in --workdir")
    run.add_argument("task", nargs="?", help="what to do (omit with --resume)")
    run.add_argument("--files", nargs="+", default=[], metavar="F", help="input files (copied into WORKDIR/inputs)")
    run.add_argument("--workdir", default=None, help="run folder: trace.jsonl, inputs/, outputs/ (default runs/agent/<time>)")
    run.add_argument("--mode", default="auto", choices=["auto", "data", "write", "code", "research"], help="which tools to offer")
    run.add_argument("--docs", default=None, help="document folder for search/open (research mode)")
    run.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its trace")
    _add_endpoint_arguments(run)
    run.set_defaults(func=_run)

    ev = sub.add_parser("eval", help="run a suite K times per task: pass@1, pass@k, pass^k, failure taxonomy, report")
    ev.add_argument("--suite", required=True, help="a shipped suite (function-calling, data, write, code, abstain) or a folder")
    ev.add_argument("-k", type=int_at_least(1), default=4, help="runs per task (default 4)")
    ev.add_argument("--out", required=True, help="output folder: results.json, report.md, plots, runs/<task>/<i>/")
    ev.add_argument("--task", action="append", default=None, metavar="ID", help="only this task (repeatable)")
    ev.add_argument("--check-references", action="store_true",
                    help="replay each task's reference solution (a scripted endpoint, no model) through the real loop, "
                         "tools and verifiers: checks a suite you wrote")
    ev.add_argument("--concurrency", type=int_at_least(1), default=1,
                    help="runs at once (default 1; raise it for an endpoint that batches, e.g. vLLM or a hosted API)")
    _add_endpoint_arguments(ev)
    ev.set_defaults(func=_eval)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


@contextlib.contextmanager
def _endpoint(args, log_path: Path):
    if args.base_url:
        yield args.base_url
        return
    from glm5.agent.local_server import local_server

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with local_server(Path(args.serve_model) if args.serve_model else None, log_path=log_path) as url:
        yield url


def _config(args, **overrides):
    from glm5.agent.loop import AgentConfig

    fields = dict(max_tokens=args.max_tokens, context_tokens=args.context_tokens, tool_timeout_s=args.tool_timeout,
                  temperature=args.temperature, unsafe_no_sandbox=args.unsafe_no_sandbox, mcp_commands=tuple(args.mcp))
    if args.max_steps is not None:
        fields["max_steps"] = args.max_steps
    if args.timeout is not None:
        fields["timeout_s"] = args.timeout
    fields.update(overrides)
    return AgentConfig(**fields)


def _close_mcp() -> None:
    try:
        from glm5.agent.tools.mcp import close_mcp_servers
    except ImportError:
        return
    close_mcp_servers()


def _say_sandbox(mode: str | None) -> None:
    """Say once, at start, what isolation python/shell get here (they refuse without it unless unsafe)."""
    if mode in (None, "auto", "data", "code"):
        from glm5.agent.sandbox import sandbox_status

        print(f"glm5 agent: {sandbox_status().summary}", file=sys.stderr)


def _one_line_errors(func):
    """An MCP server that does not start or an endpoint that cannot be reached: one line, exit code 2."""

    def wrapped(args) -> int:
        from glm5.agent.client import ModelCallError
        from glm5.agent.tools.mcp import MCPError

        try:
            return func(args)
        except (MCPError, ModelCallError) as err:
            print(f"glm5 agent {args.agent_command}: error: {err}", file=sys.stderr)
            return 2

    return wrapped


def _progress(event: dict) -> None:
    from glm5.agent.loop import describe_event

    line = describe_event(event)
    if line:
        print(line, file=sys.stderr, flush=True)


@_one_line_errors
def _run(args) -> int:
    from dataclasses import asdict

    from glm5.agent.client import ChatClient
    from glm5.agent.loop import AgentConfig, resume_agent, run_agent
    from glm5.agent.trace import read_trace

    if args.resume:
        workdir = Path(args.resume)
        if not (workdir / "trace.jsonl").exists():
            raise ValueError(f"nothing to resume: {workdir / 'trace.jsonl'} does not exist")
        start = next((e for e in read_trace(workdir / "trace.jsonl") if e["type"] == "start"), None)
        if start is None:
            raise ValueError(f"{workdir / 'trace.jsonl'} has no start event")
        saved = asdict(AgentConfig(**start["config"]))
        given = asdict(_config(args))
        # what the command line sets explicitly wins; the rest is the run's own configuration
        if args.max_steps is not None:
            saved["max_steps"] = given["max_steps"]
        if args.timeout is not None:
            saved["timeout_s"] = given["timeout_s"]
        if args.max_tokens is not None:
            saved["max_tokens"] = given["max_tokens"]
        config = AgentConfig(**saved)
    else:
        if not args.task:
            raise ValueError("give a TASK (or --resume DIR)")
        workdir = Path(args.workdir or f"runs/agent/{time.strftime('%Y%m%d-%H%M%S')}")
        config = _config(args, mode=args.mode, docs_dir=str(Path(args.docs).resolve()) if args.docs else None)
        if args.docs and not Path(args.docs).is_dir():
            raise ValueError(f"--docs {args.docs}: not a folder")
        for f in args.files:  # before a server is started for nothing
            if not Path(f).is_file():
                raise ValueError(f"--files {f}: no such file")
        if (workdir / "trace.jsonl").exists():
            raise ValueError(f"{workdir} already holds a run; continue it with --resume {workdir} or pick another --workdir")
    _say_sandbox(config.mode)
    try:
        with _endpoint(args, workdir / "serve.log") as url:
            client = ChatClient(url, model=args.model, api_key=args.api_key)
            if args.resume:
                result = resume_agent(workdir, client, config, on_event=_progress)
            else:
                result = run_agent(args.task, workdir, client, config, files=[Path(f) for f in args.files],
                                   on_event=_progress)
    finally:
        _close_mcp()
    print(result.answer)
    print(f"glm5 agent run: {result.status}{' (abstained)' if result.abstained else ''} after {result.steps} model "
          f"call(s), {result.tokens:,} tokens, {result.seconds:.1f} s; trace {workdir / 'trace.jsonl'}, "
          f"outputs {workdir / 'outputs'} ({len(result.outputs)} file(s))", file=sys.stderr)
    return 0 if result.status in ("answered", "abstained") else 1


@_one_line_errors
def _eval(args) -> int:
    from glm5.agent.client import ChatClient
    from glm5.agent.eval.harness import run_suite
    from glm5.agent.eval.report import write_report
    from glm5.agent.eval.tasks import load_suite

    suite = load_suite(args.suite)
    out = Path(args.out)
    config = _config(args)
    if args.check_references:
        return _check_references(suite, out, config, args)
    _say_sandbox(None if any(t.mode in ("auto", "data", "code") for t in suite.tasks) else "write")
    try:
        with _endpoint(args, out / "serve.log") as url:
            client = ChatClient(url, model=args.model, api_key=args.api_key)
            meta = {"endpoint": "glm5 serve (started by glm5 agent eval)" if not args.base_url else url}
            results = run_suite(suite, client, out, args.k, config, meta=meta, tasks=args.task,
                                concurrency=args.concurrency)
    finally:
        _close_mcp()
    report = write_report(results, out)
    o = results["overall"]
    fails = ", ".join(f"{k} {v}" for k, v in o["failures"].items()) or "none"
    print(f"glm5 agent eval: {suite.name}, {o['tasks']} tasks x {args.k} runs: pass@1 {o['pass@1']:.3f}, "
          f"pass@{args.k} {o['pass@k']:.3f}, pass^{args.k} {o['pass^k']:.3f}; failures: {fails}")
    print(f"wrote {out / 'results.json'} and {report}")
    return 0


def _check_references(suite, out: Path, config, args) -> int:
    from glm5.agent.client import ChatClient
    from glm5.agent.eval.harness import run_suite
    from glm5.agent.scripted import ScriptedEndpoint

    missing = [t.id for t in suite.tasks if not t.reference]
    scripts = {t.prompt: t.reference for t in suite.tasks if t.reference}
    tasks = [t.id for t in suite.tasks if t.reference] if missing else args.task
    with ScriptedEndpoint(scripts) as endpoint:
        results = run_suite(suite, ChatClient(endpoint.base_url), out, 1, config, tasks=tasks,
                            meta={"endpoint": "scripted references"})
    bad = [r for r in results["runs"] if not r["passed"] or r["errors"]]
    for r in bad:
        why = r["first_error"] or r["detail"] or f"{r['errors']} error(s) on the way"
        print(f"{suite.name}/{r['task']}: the reference does not pass cleanly: {r['failure'] or 'passed'}: {why}")
    for task_id in missing:
        print(f"{suite.name}/{task_id}: no reference solution to check")
    print(f"glm5 agent eval --check-references: {len(results['runs']) - len(bad)} of {len(results['runs'])} "
          f"reference solutions pass; runs in {out / 'runs'}")
    return 1 if bad else 0
