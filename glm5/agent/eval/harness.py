"""Run a suite: every task K times, each run verified and classified; results.json after every run.

    from glm5.agent.eval.harness import run_suite
    results = run_suite(load_suite("data"), ChatClient(url, model), Path("runs/eval"), k=4, defaults=AgentConfig())

Each run has its own folder `OUT/runs/<task id>/<i>/` (trace.jsonl, inputs/, outputs/). Running the same
command again continues: finished runs are read back from their traces, a run cut short is resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from glm5.agent.client import ChatClient
from glm5.agent.eval.metrics import FAILURE_CLASSES, classify, pass_at_k, pass_hat_k
from glm5.agent.eval.tasks import Suite, Task
from glm5.agent.eval.verify import verify
from glm5.agent.loop import AgentConfig, resume_agent, run_agent
from glm5.agent.trace import read_trace


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def task_config(task: Task, defaults: AgentConfig) -> AgentConfig:
    return replace(defaults, mode=task.mode, max_steps=task.max_steps or defaults.max_steps,
                   timeout_s=task.timeout_s or defaults.timeout_s, docs_dir=str(task.docs) if task.docs else None,
                   single_turn=bool(task.tools))


def run_once(task: Task, run_dir: Path, client: ChatClient, defaults: AgentConfig) -> dict:
    """One run of a task (or its finished/partial earlier run), verified and classified."""
    config = task_config(task, defaults)
    trace = run_dir / "trace.jsonl"
    if trace.exists() and not any(e["type"] == "start" for e in read_trace(trace)):
        shutil.rmtree(run_dir)  # killed before its first event was whole: nothing to continue, start it again
    if trace.exists():
        result = resume_agent(run_dir, client, config)
    else:
        result = run_agent(task.prompt, run_dir, client, config, files=task.files, repo=task.repo,
                           declared_tools=task.tools)
    events = read_trace(run_dir / "trace.jsonl")
    errors, calls_ok = [], []
    for position, e in enumerate(events):
        if e["type"] == "error":
            errors.append({**e, "position": position})
        elif e["type"] == "tool_result":
            calls_ok.append((position, e.get("name"), bool(e.get("ok"))))
    if result.status in ("step_limit", "timeout", "model_error"):
        verdict_passed, verdict_kind, grade, detail = False, None, None, result.status
    else:
        verdict = verify(task, result)
        verdict_passed, verdict_kind, grade, detail = verdict.passed, verdict.kind, verdict.grade, verdict.detail
    failure = None
    first_error = None
    if not verdict_passed:
        failure = classify(errors, verdict_kind, calls_ok)
        first = next((e for e in errors if classify([e], None, calls_ok) == failure), None)
        first_error = first["message"] if first else detail
    if any(v["type"] == "abstain" for v in task.verify):  # SimpleQA grades: answer-or-abstain tasks only
        grade = grade or ("not_attempted" if result.abstained else "incorrect")
    else:
        grade = None
    return {
        "task": task.id, "category": task.category, "run": int(run_dir.name), "passed": verdict_passed,
        "failure": failure, "first_error": first_error, "detail": detail, "grade": grade, "status": result.status,
        "abstained": result.abstained, "steps": result.steps, "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens, "tokens": result.tokens, "seconds": round(result.seconds, 3),
        "tool_calls": len(result.calls), "errors": len(errors), "answer": (result.answer or "")[:400],
        "calls_by_tool": dict(Counter(c["name"] for c in result.calls)),
        "failed_by_tool": dict(Counter(e.get("tool") for e in errors if e.get("tool") is not None)),
        "errors_by_kind": dict(Counter(e["kind"] for e in errors)),
        "outputs": result.outputs, "dir": str(run_dir),
    }


def _mean(values) -> float:
    values = list(values)
    return float(statistics.fmean(values)) if values else 0.0


def summarize(records: list[dict], k: int) -> dict:
    """Per task, per category and overall figures from the run records (pass@k / pass^k over all n runs)."""
    tasks: dict[str, list[dict]] = {}
    for r in records:
        tasks.setdefault(r["task"], []).append(r)
    per_task = []
    for task_id, runs in tasks.items():
        n, c = len(runs), sum(r["passed"] for r in runs)
        kk = min(k, n)
        failures = {f: sum(r["failure"] == f for r in runs) for f in FAILURE_CLASSES}
        per_task.append({
            "task": task_id, "category": runs[0]["category"], "n": n, "c": c,
            "pass@1": pass_at_k(n, c, 1), "pass@k": pass_at_k(n, c, kk), "pass^k": pass_hat_k(n, c, kk),
            "pass^j": [pass_hat_k(n, c, j) for j in range(1, n + 1)],
            "failures": {f: v for f, v in failures.items() if v},
            "mean_tokens": _mean(r["tokens"] for r in runs), "mean_steps": _mean(r["steps"] for r in runs),
            "mean_seconds": _mean(r["seconds"] for r in runs),
            "grades": {g: sum(r["grade"] == g for r in runs) for g in ("correct", "incorrect", "not_attempted")
                       if any(r["grade"] for r in runs)},
        })

    def aggregate(rows: list[dict], runs: list[dict]) -> dict:
        failures = {f: sum(r["failure"] == f for r in runs) for f in FAILURE_CLASSES}
        depth = min((t["n"] for t in rows), default=0)
        out = {
            "tasks": len(rows), "runs": len(runs), "passed_runs": sum(r["passed"] for r in runs),
            "pass@1": _mean(t["pass@1"] for t in rows), "pass@k": _mean(t["pass@k"] for t in rows),
            "pass^k": _mean(t["pass^k"] for t in rows),
            "pass^j": [_mean(t["pass^j"][j] for t in rows) for j in range(depth)],
            "failures": {f: v for f, v in failures.items() if v},
            "mean_tokens": _mean(r["tokens"] for r in runs), "mean_steps": _mean(r["steps"] for r in runs),
            "mean_seconds": _mean(r["seconds"] for r in runs), "total_seconds": sum(r["seconds"] for r in runs),
        }
        graded = [r for r in runs if r["grade"]]
        if graded:
            correct = sum(r["grade"] == "correct" for r in graded)
            attempted = sum(r["grade"] != "not_attempted" for r in graded)
            overall_correct = correct / len(graded)
            given_attempted = correct / attempted if attempted else 0.0
            f_score = (2 * overall_correct * given_attempted / (overall_correct + given_attempted)
                       if overall_correct + given_attempted else 0.0)
            out["simpleqa"] = {"correct": correct, "incorrect": attempted - correct,
                               "not_attempted": len(graded) - attempted, "overall_correct": overall_correct,
                               "correct_given_attempted": given_attempted, "f_score": f_score}
        return out

    categories = {}
    for cat in sorted({t["category"] for t in per_task}):
        rows = [t for t in per_task if t["category"] == cat]
        categories[cat] = aggregate(rows, [r for r in records if r["category"] == cat])
    return {"tasks": per_task, "categories": categories, "overall": aggregate(per_task, records)}


def run_suite(suite: Suite, client: ChatClient, out: Path, k: int, defaults: AgentConfig, *,
              meta: dict | None = None, progress: bool = True, tasks: list[str] | None = None,
              concurrency: int = 1) -> dict:
    """Run every task of `suite` k times into `out`; write out/results.json after each run; return it.
    `concurrency` runs go at once (threads: each run waits on HTTP and on its sandbox)."""
    if k < 1:
        raise ValueError("-k must be >= 1")
    selected = [t for t in suite.tasks if not tasks or t.id in tasks]
    if tasks and len(selected) != len(set(tasks)):
        missing = set(tasks) - {t.id for t in selected}
        raise ValueError(f"no task(s) {', '.join(sorted(missing))} in suite {suite.name}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"suite": suite.name, "suite_dir": str(suite.root), "k": k, "concurrency": concurrency, "model": client.model,
               "base_url": client.base_url, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "config": {"max_steps": defaults.max_steps, "max_tokens": defaults.max_tokens,
                          "timeout_s": defaults.timeout_s, "context_tokens": defaults.context_tokens},
               **(meta or {}), "runs": []}
    jobs = [(position, task, i) for position, task in enumerate(selected) for i in range(k)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"agent eval {suite.name}", unit="run", file=sys.stderr)

    def record_done(position: int, record: dict) -> None:
        results["runs"].append({**record, "_order": (position, record["run"])})
        results["runs"].sort(key=lambda r: r["_order"])
        results["model"] = client.model
        runs = [{key: v for key, v in r.items() if key != "_order"} for r in results["runs"]]
        results.update(summarize(runs, k))
        write_json_atomic(out / "results.json", {**results, "runs": runs})
        if bar is not None:
            bar.set_postfix_str(f"{record['task']}: {'pass' if record['passed'] else record['failure']}")
            bar.update(1)

    def one(job):
        position, task, i = job
        return position, run_once(task, out / "runs" / task.id / str(i), client, defaults)

    if concurrency <= 1:
        for job in jobs:
            record_done(*one(job))
    else:  # runs are independent (own folder, own trace); the endpoint does the batching
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            for future in as_completed([pool.submit(one, job) for job in jobs]):
                record_done(*future.result())
    results["runs"] = [{key: v for key, v in r.items() if key != "_order"} for r in results["runs"]]
    if bar is not None:
        bar.close()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    write_json_atomic(out / "results.json", results)
    return results
