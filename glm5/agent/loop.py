"""The agent loop: a task in, tool calls against an OpenAI-compatible endpoint, deliverables and a trace out.

    from glm5.agent.client import ChatClient
    from glm5.agent.loop import AgentConfig, run_agent
    result = run_agent("Mean price in sales.csv? End with @answer[...]", Path("run1"),
                       ChatClient("http://127.0.0.1:8000"), AgentConfig(mode="data"), files=[Path("sales.csv")])
    result.status, result.answer, result.abstained      # run1/trace.jsonl, run1/outputs/

One step is one model call. The assistant's reasoning goes back into the history as `reasoning_content`
(GLM-5's interleaved thinking: the chat template keeps the reasoning of the turns after the last user
message). When a reply has tool calls, each is decoded, checked and run; whatever goes wrong (arguments that
are not JSON, an unknown tool, arguments that do not fit the schema, a tool that fails or raises) becomes the
tool's result text, so the model sees the error and can try again, and the trace gets an `error` event. A
reply without tool calls is the final answer, unless it carries a tool call the endpoint did not parse (a
`<tool_call>` in the text), which is sent back as a malformed call.

Abstention: the system prompt asks the model to begin its final answer with `ABSTAIN:` when what it found
does not answer the task; `is_abstention` accepts that marker with or without brackets, bold or a different
case (`[ABSTAIN]`, `**Abstain:**`), and an answer that opens with a plain decline ("I cannot answer",
"The documents do not say", "There is no information") counts too, so the trace's `abstained: true` does
not depend on the model following the instruction to the letter.

A run ends as `answered`, `abstained`, `step_limit` (still calling tools after max_steps calls), `timeout`
(the run's wall-time limit), `model_error` (the endpoint failed) or, for single-turn function calling,
`calls`. `resume=True` continues the run in `workdir` from its trace (see `glm5.agent.trace`).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from glm5.agent.client import ChatClient, ModelCallError, ModelTimeout
from glm5.agent.context import fit_context
from glm5.agent.trace import Trace, conversation, pending_tool_calls, read_trace

MODES = ("auto", "data", "write", "code", "research")

ABSTAIN_MARKER = "ABSTAIN:"
_ABSTAIN_RE = re.compile(r"^[\s>*_#`\[(]*abstain(ed)?\b[\])*_`]*\s*[:.\-—]?", re.IGNORECASE)
# plain declines a model writes despite the instruction, only at the very start of the answer
_DECLINE_RE = re.compile(
    r"^[\s>*_#`]*(i (cannot|can't|can not|could not|couldn't|am unable to|was unable to) (answer|find|determine|tell)"
    r"|i (don't|do not) know"
    r"|(the|these|the provided|the available) (documents?|sources?|files?|data) (do|does|did) not (say|mention|contain|state|include|answer)"
    r"|there is no (information|mention|data|record)"
    r"|no (information|data|record) (is|was) (available|found|given))\b", re.IGNORECASE)
# tool-call syntax left in the text: the endpoint could not parse a call the model meant to make
_UNPARSED_CALL_RE = re.compile(r"<tool_call>|<arg_key>|<arg_value>|^\s*\{\s*\"name\"\s*:\s*\"[^\"]+\"\s*,\s*\"arguments\"")

MODE_GUIDANCE = {
    "auto": "Use whichever tools the task needs.",
    "data": ("Answer from the user's data files (listed below, under inputs/). Query them with the sql tool "
             "(DuckDB) or compute with python; never estimate a number you can compute. Save charts and exported "
             "tables under outputs/."),
    "write": ("Produce the requested document under outputs/ with the export tool (docx or pdf), with every "
              "section and table the task asks for."),
    "code": ("The repository to work on is under outputs/. Read it, change it with write_file, and run its tests "
             "with shell or python before you answer."),
    "research": ("Find the answer in the local documents with search, read the best hits with open, and cite "
                 "each fact's source as [document name]. Answer only from what the documents say."),
}


SINGLE_TURN_PROMPT = ("You are GLM-5. Call the functions the user's request needs, several at once when it needs "
                      "several, with arguments taken from the request. If no function fits, answer in plain text.")


def system_prompt(mode: str, files: Sequence[str], outputs_hint: str = "outputs/") -> str:
    lines = [
        "You are GLM-5 in Agent Mode: you complete the user's task by calling tools, then give a final answer.",
        MODE_GUIDANCE[mode],
        f"Deliverables (files for the user) go under {outputs_hint}. Paths are relative to the working directory.",
        "When a tool returns an error, read it and correct the call.",
        "Give your final answer as plain text without tool calls once the task is done.",
        f"If what you gathered does not answer the question, do not guess: begin the final answer with "
        f"'{ABSTAIN_MARKER}' and say what is missing.",
    ]
    if files:
        lines.append("Input files: " + ", ".join(files))
    return "\n".join(lines)


def is_abstention(answer: str) -> bool:
    """Does a final answer abstain? It starts with the ABSTAIN marker (in any common formatting), or with a
    plain decline ("I cannot answer ...", "The documents do not say ...", "There is no information ...")."""
    return bool(_ABSTAIN_RE.match(answer or "") or _DECLINE_RE.match(answer or ""))


@dataclass
class AgentConfig:
    mode: str = "auto"
    max_steps: int = 20              # model calls at most
    max_tokens: int | None = None    # completion tokens per model call (None: the endpoint decides)
    timeout_s: float = 900.0         # wall time of the whole run (tools included)
    context_tokens: int = 32_000     # budget of the history sent to the model (estimated tokens)
    tool_timeout_s: float = 30.0     # per tool call (the sandbox's limit)
    memory_mb: int = 1024            # per tool call
    temperature: float | None = None
    unsafe_no_sandbox: bool = False
    mcp_commands: tuple[str, ...] = ()
    docs_dir: str | None = None
    single_turn: bool = False        # function calling: one model call; its tool calls are checked, not run

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown agent mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if self.timeout_s <= 0:
            raise ValueError("timeout must be > 0 seconds")
        self.mcp_commands = tuple(self.mcp_commands)


@dataclass
class AgentResult:
    status: str
    answer: str
    abstained: bool
    steps: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    workdir: Path
    calls: list[dict] = field(default_factory=list)    # every tool call: name, arguments (dict or None), ok
    errors: list[dict] = field(default_factory=list)   # the trace's error events, in order

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def outputs(self) -> list[str]:
        root = self.workdir / "outputs"
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


class _Run:
    """The state of one run: conversation, counters, trace."""

    def __init__(self, workdir: Path, client: ChatClient, config: AgentConfig, tools: list, declared: list[dict],
                 on_event=None):
        from glm5.agent.tools.base import ToolContext

        self.workdir, self.client, self.config = workdir, client, config
        self.tools = {t.name: t for t in tools}
        self.declared = {d["function"]["name"]: d["function"] for d in declared}
        self.ctx = ToolContext(workdir=workdir, files=sorted((workdir / "inputs").glob("*")) if (workdir / "inputs").exists() else [],
                               docs_dir=Path(config.docs_dir) if config.docs_dir else None,
                               timeout_s=config.tool_timeout_s, memory_mb=config.memory_mb,
                               unsafe_no_sandbox=config.unsafe_no_sandbox)
        self.trace = Trace(workdir / "trace.jsonl", on_event)
        self.messages: list[dict] = []
        self.calls: list[dict] = []
        self.errors: list[dict] = []
        self.steps = self.prompt_tokens = self.completion_tokens = 0
        self.deadline = float("inf")

    def schemas(self) -> list[dict]:
        from glm5.agent.tools.base import openai_tool_schema

        return [openai_tool_schema(t) for t in self.tools.values()] + [{"type": "function", "function": d}
                                                                       for d in self.declared.values()]

    def error(self, kind: str, message: str, **extra) -> None:
        self.errors.append(self.trace.write("error", step=self.steps, kind=kind, message=message, **extra))

    # ---- tool calls --------------------------------------------------------------------------------------
    def run_call(self, call_id: str, name: str, raw_arguments: str) -> None:
        from glm5.agent.tools.base import ToolArgumentError, validate_arguments

        self.trace.write("tool_call", step=self.steps, id=call_id, name=name, arguments=raw_arguments)
        record = {"name": name, "arguments": None, "ok": False}
        self.calls.append(record)
        start = time.monotonic()
        files: list[str] = []
        try:
            arguments = json.loads(raw_arguments) if raw_arguments.strip() else {}
        except json.JSONDecodeError as err:
            arguments, kind, text = None, "malformed_call", f"the arguments of {name!r} are not valid JSON ({err})"
        else:
            record["arguments"] = arguments
            kind = text = None
        if kind is None and not name:
            kind, text = "malformed_call", "a tool call without a function name"
        elif kind is None and name not in self.tools and name not in self.declared:
            known = ", ".join(sorted([*self.tools, *self.declared]))
            kind, text = "unknown_tool", f"there is no tool named {name!r}; the tools are: {known}"
        elif kind is None and name in self.declared:
            # a declared function is only checked against its schema, as BFCL scores it, never run
            schema = self.declared[name].get("parameters") or {"type": "object", "properties": {}}
            try:
                validate_arguments(SimpleNamespace(name=name, parameters=schema), arguments)
            except ToolArgumentError as err:
                kind, text = "bad_arguments", f"{name}: {err}"
            else:
                record["ok"], text = True, "recorded"
        elif kind is None:
            tool = self.tools[name]
            # a tool call may not outlive the run: its limit is capped by the run's remaining time
            self.ctx.timeout_s = max(1.0, min(self.config.tool_timeout_s, self.deadline - time.monotonic()))
            try:
                validate_arguments(tool, arguments)
                result = tool(arguments, self.ctx)
            except ToolArgumentError as err:
                kind, text = "bad_arguments", f"{name}: {err}"
            except Exception as err:  # a tool that raises must not end the run: the model sees why
                kind, text = "tool_error", f"{name} failed: {type(err).__name__}: {err}"
            else:
                files = list(result.files)
                if result.ok:
                    record["ok"], text = True, result.content
                else:
                    kind, text = "tool_error", result.content
        if kind is not None:
            self.error(kind, text, tool=name, id=call_id)
            text = f"ERROR ({kind}): {text}"
        message = {"role": "tool", "tool_call_id": call_id, "content": text}
        if self.config.single_turn:
            return  # checked, not sent anywhere: the run ends after this reply
        self.messages.append(message)
        self.trace.write("tool_result", step=self.steps, id=call_id, name=name, ok=kind is None,
                         seconds=round(time.monotonic() - start, 3), files=files, message=message)

    # ---- the run -----------------------------------------------------------------------------------------
    def finish(self, status: str, answer: str, started: float, seconds_before: float) -> AgentResult:
        abstained = status == "abstained"
        seconds = seconds_before + time.monotonic() - started
        self.trace.write("final", status=status, answer=answer, abstained=abstained, steps=self.steps,
                         prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                         seconds=round(seconds, 3))
        self.trace.close()
        return AgentResult(status, answer, abstained, self.steps, self.prompt_tokens, self.completion_tokens, seconds,
                           self.workdir, self.calls, self.errors)

    def loop(self, seconds_before: float = 0.0) -> AgentResult:
        config = self.config
        started = time.monotonic()
        deadline = self.deadline = started + config.timeout_s
        schemas = self.schemas()
        for call in pending_tool_calls(self.messages):  # resumed after a kill while tools ran
            function = call.get("function") or {}
            self.run_call(call.get("id", ""), function.get("name", ""), function.get("arguments", ""))
        while True:
            if self.steps >= config.max_steps:
                self.error("step_limit", f"no final answer after {config.max_steps} model calls")
                return self.finish("step_limit", "", started, seconds_before)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.error("timeout", f"the run passed its {config.timeout_s:.0f} s limit")
                return self.finish("timeout", "", started, seconds_before)
            view, compacted = fit_context(self.messages, config.context_tokens)
            try:
                reply = self.client.chat(view, schemas, max_tokens=config.max_tokens, timeout_s=remaining,
                                         temperature=config.temperature)
            except ModelTimeout as err:
                self.error("timeout", str(err))
                return self.finish("timeout", "", started, seconds_before)
            except ModelCallError as err:
                self.error("model_error", str(err))
                return self.finish("model_error", "", started, seconds_before)
            self.steps += 1
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens
            message = reply.to_message()
            self.messages.append(message)
            self.trace.write("model_call", step=self.steps, seconds=round(reply.seconds, 3),
                             prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                             finish_reason=reply.finish_reason, compacted=compacted, message=message)
            if reply.tool_calls:
                for call in reply.tool_calls:
                    self.run_call(call.id, call.name, call.arguments)
                if config.single_turn:
                    return self.finish("calls", reply.content, started, seconds_before)
                continue
            if _UNPARSED_CALL_RE.search(reply.content):
                text = ("Your reply contains a tool call the server could not parse. Call tools through the tool "
                        "interface with a known tool name and JSON arguments, or answer in plain text.")
                self.error("malformed_call", "unparsed tool-call syntax in the reply text", text=reply.content[:500])
                if config.single_turn:
                    return self.finish("calls", reply.content, started, seconds_before)
                feedback = {"role": "user", "content": text}
                self.messages.append(feedback)
                self.trace.write("feedback", step=self.steps, message=feedback)
                continue
            if config.single_turn:
                return self.finish("calls", reply.content, started, seconds_before)
            status = "abstained" if is_abstention(reply.content) else "answered"
            return self.finish(status, reply.content, started, seconds_before)


def _prepare_workdir(workdir: Path, files: Sequence[Path], repo: Path | None) -> list[str]:
    """Copy the inputs into workdir/inputs (a run is reproducible and resumable without the originals)."""
    (workdir / "outputs").mkdir(parents=True, exist_ok=True)
    names = []
    for f in files:
        f = Path(f)
        if not f.is_file():
            raise ValueError(f"input file not found: {f}")
        (workdir / "inputs").mkdir(exist_ok=True)
        shutil.copy2(f, workdir / "inputs" / f.name)
        names.append(f"inputs/{f.name}")
    if repo is not None:
        shutil.copytree(repo, workdir / "outputs", dirs_exist_ok=True)
    return names


def make_tools(config: AgentConfig, workdir: Path) -> list:
    from glm5.agent.tools import tools_for_mode
    from glm5.agent.tools.base import ToolContext

    ctx = ToolContext(workdir=workdir, files=[], docs_dir=Path(config.docs_dir) if config.docs_dir else None,
                      timeout_s=config.tool_timeout_s, memory_mb=config.memory_mb,
                      unsafe_no_sandbox=config.unsafe_no_sandbox)
    return tools_for_mode(config.mode, ctx, config.mcp_commands)


def run_agent(task: str, workdir: Path, client: ChatClient, config: AgentConfig, *, files: Sequence[Path] = (),
              repo: Path | None = None, tools: list | None = None, declared_tools: Sequence[dict] = (),
              on_event=None) -> AgentResult:
    """Run `task` to its end in `workdir` (a fresh or empty folder; see `resume_agent` to continue one).

    `tools`: the tool objects to offer (default: the mode's, `glm5.agent.tools.tools_for_mode`).
    `declared_tools`: OpenAI function schemas the model may call but that are only checked and recorded
    (function-calling evaluation). `repo`: a folder copied into workdir/outputs (code tasks).
    `on_event(event)`: called with each trace event as it is written (`describe_event` formats one).
    """
    workdir = Path(workdir)
    if (workdir / "trace.jsonl").exists():
        raise ValueError(f"{workdir} already holds a run (trace.jsonl); continue it with --resume or pick another --workdir")
    names = _prepare_workdir(workdir, files, repo)
    if tools is None:
        tools = [] if config.single_turn else make_tools(config, workdir)
    run = _Run(workdir, client, config, tools, list(declared_tools), on_event)
    system = {"role": "system", "content": SINGLE_TURN_PROMPT if config.single_turn else system_prompt(config.mode, names)}
    user = {"role": "user", "content": task}
    run.messages = [system, user]
    run.trace.write("start", task=task, model=client.model, base_url=client.base_url, config=asdict(config),
                    tools=sorted(run.tools), declared_tools=list(declared_tools), files=names, message=system, user=user)
    return run.loop()


def resume_agent(workdir: Path, client: ChatClient, config: AgentConfig | None = None, *,
                 tools: list | None = None, on_event=None) -> AgentResult:
    """Continue the run in `workdir` from its trace: the conversation, step and token counts are rebuilt,
    tool calls the kill left without a result are run, and the loop goes on. A finished run is returned
    as it ended. The wall-time limit counts again from the resume."""
    workdir = Path(workdir)
    path = workdir / "trace.jsonl"
    if not path.exists():
        raise ValueError(f"nothing to resume: {path} does not exist")
    events = read_trace(path)
    start = next((e for e in events if e["type"] == "start"), None)
    if start is None:
        raise ValueError(f"{path} has no start event; it is not a glm5 agent trace")
    if config is None:
        config = AgentConfig(**start["config"])
    if any(e["type"] == "final" for e in events):
        return result_from_trace(workdir)
    if tools is None:
        tools = [] if config.single_turn else make_tools(config, workdir)
    run = _Run(workdir, client, config, tools, start.get("declared_tools") or [], on_event)
    run.messages = conversation(events)
    calls = [e for e in events if e["type"] == "model_call"]
    run.steps = len(calls)
    run.prompt_tokens = sum(e.get("prompt_tokens", 0) for e in calls)
    run.completion_tokens = sum(e.get("completion_tokens", 0) for e in calls)
    run.errors = [e for e in events if e["type"] == "error"]
    run.calls = calls_from_events(events)
    seconds_before = (events[-1]["time"] - start["time"]) if events else 0.0
    run.trace.write("resume", steps=run.steps)
    return run.loop(seconds_before)


def calls_from_events(events: list[dict]) -> list[dict]:
    """Every tool call of a trace: name, arguments (decoded, or None when not JSON), ok (no error for its id)."""
    failed = {e.get("id") for e in events if e["type"] == "error" and e.get("id") is not None}
    calls = []
    for e in events:
        if e["type"] == "tool_call":
            try:
                arguments = json.loads(e["arguments"]) if e["arguments"].strip() else {}
            except (json.JSONDecodeError, AttributeError):
                arguments = None
            calls.append({"name": e["name"], "arguments": arguments, "ok": e["id"] not in failed})
    return calls


def result_from_trace(workdir: Path) -> AgentResult:
    """The result of a finished run, read back from its trace."""
    workdir = Path(workdir)
    events = read_trace(workdir / "trace.jsonl")
    final = next((e for e in reversed(events) if e["type"] == "final"), None)
    if final is None:
        raise ValueError(f"the run in {workdir} has not finished (no final event); continue it with --resume")
    return AgentResult(final["status"], final["answer"], final["abstained"], final["steps"], final["prompt_tokens"],
                       final["completion_tokens"], final["seconds"], workdir, calls_from_events(events),
                       [e for e in events if e["type"] == "error"])


def describe_event(event: dict) -> str | None:
    """One progress line for a trace event (what `glm5 agent run` prints as it goes), or None."""
    kind = event["type"]
    if kind == "model_call":
        message = event["message"]
        calls = [c["function"]["name"] for c in message.get("tool_calls") or []]
        what = f"calls {', '.join(calls)}" if calls else "answers"
        return (f"step {event['step']}: model {event['seconds']:.1f} s, {event['prompt_tokens']:,} + "
                f"{event['completion_tokens']:,} tokens, {what}")
    if kind == "tool_result":
        text = " ".join(str(event["message"]["content"]).split())
        return f"  {event['name']} {'ok' if event['ok'] else 'failed'} ({event['seconds']:.1f} s): {text[:100]}"
    if kind == "error" and event["kind"] in ("step_limit", "timeout", "model_error"):
        return f"  {event['kind']}: {event['message'][:160]}"
    if kind == "resume":
        return f"resuming after {event['steps']} model call(s)"
    return None
