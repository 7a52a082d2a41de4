"""report.md and its plots for a results.json of `glm5 agent eval`.

    glm5 agent eval ... --out runs/eval         # writes it at the end
    python -m glm5.agent.eval.report runs/eval  # rewrites it from results.json

Plots (PNG, matplotlib): reliability.png (pass^j for j = 1..K, overall and per category: how fast
consistency falls as more runs must all succeed), failures.png (failure classes per task), cost.png
(tokens and seconds per run, per task).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from glm5.agent.eval.metrics import FAILURE_CLASSES

WHAT_IT_MEANS = {
    "malformed_call": "tool call it could not decode (arguments not JSON, call syntax left in the text)",
    "unknown_tool": "called a tool that does not exist",
    "bad_arguments": "arguments did not fit the tool's schema",
    "tool_error_unrecovered": "a tool failed and the model never got that tool to work",
    "step_limit": "still calling tools when the step limit came",
    "wrong_answer": "finished, but the answer or deliverable is wrong",
    "fabricated": "answered (or called a function) where nothing fits: should have abstained",
    "wrong_abstention": "declined although the answer was there",
    "timeout": "ran out of wall time",
    "endpoint_error": "the endpoint failed (not the model's fault)",
}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    k = results["k"]
    overall = results["overall"]
    fig, ax = plt.subplots(figsize=(6, 4))
    js = list(range(1, len(overall["pass^j"]) + 1))
    ax.plot(js, overall["pass^j"], "o-", linewidth=2.5, color="black", label="overall")
    for name, cat in results["categories"].items():
        if len(results["categories"]) > 1:
            ax.plot(range(1, len(cat["pass^j"]) + 1), cat["pass^j"], "o--", alpha=0.7, label=name)
    ax.axhline(overall["pass@k"], color="grey", linestyle=":", label=f"pass@{k} (overall)")
    ax.set_xlabel("j (runs that must all succeed)")
    ax.set_ylabel("pass^j")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(js)
    ax.set_title(f"Reliability: {results['suite']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    made.append("reliability.png")

    tasks = results["tasks"]
    classes = [c for c in FAILURE_CLASSES if any(t["failures"].get(c) for t in tasks)]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(tasks) + 2), 4.5))
    names = [t["task"] for t in tasks]
    bottom = [0] * len(tasks)
    ax.bar(names, [t["c"] for t in tasks], color="#4caf50", label="passed")
    bottom = [t["c"] for t in tasks]
    cmap = plt.get_cmap("tab10")
    for i, cls in enumerate(classes):
        values = [t["failures"].get(cls, 0) for t in tasks]
        ax.bar(names, values, bottom=bottom, color=cmap(i % 10), label=cls)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("runs")
    ax.set_title("Outcome of every run, by task (failures by their first error)")
    ax.tick_params(axis="x", rotation=70, labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(out / "failures.png", dpi=110)
    plt.close(fig)
    made.append("failures.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    by_task: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by_task.setdefault(r["task"], []).append(r)
    for i, runs in enumerate(by_task.values()):
        colors = ["#4caf50" if r["passed"] else "#e53935" for r in runs]
        a1.scatter([i] * len(runs), [r["tokens"] for r in runs], c=colors, s=18)
        a2.scatter([i] * len(runs), [r["seconds"] for r in runs], c=colors, s=18)
    for ax, label in ((a1, "tokens per run"), (a2, "seconds per run")):
        ax.set_xticks(range(len(by_task)))
        ax.set_xticklabels(list(by_task), rotation=70, fontsize=7)
        ax.set_ylabel(label)
    a1.set_title("Cost per run (green passed, red failed)")
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=110)
    plt.close(fig)
    made.append("cost.png")
    return made


def write_report(results: dict, out: Path) -> Path:
    """Write out/report.md (+ plots) from a results dict; return the report's path."""
    out = Path(out)
    k = results["k"]
    o = results["overall"]
    tasks = results["tasks"]
    _plots(results, out)
    always = [t["task"] for t in tasks if t["c"] == t["n"]]
    never = [t["task"] for t in tasks if t["c"] == 0]
    flaky = [t["task"] for t in tasks if 0 < t["c"] < t["n"]]
    lines = [
        f"# Agent eval: `{results['suite']}` on `{results.get('model')}`",
        "",
        f"Endpoint {results.get('base_url')}, {o['tasks']} tasks x {k} runs = {o['runs']} runs, started "
        f"{results.get('started')}. Limits per run: {results['config']['max_steps']} model calls, "
        f"{results['config']['max_tokens'] or 'the endpoint default of'} tokens per call, "
        f"{results['config']['timeout_s']:.0f} s.",
        "",
        f"| pass@1 | pass@{k} | pass^{k} | runs passed | mean tokens / run | mean steps / run | mean s / run |",
        "|---|---|---|---|---|---|---|",
        f"| {_pct(o['pass@1'])} | {_pct(o['pass@k'])} | {_pct(o['pass^k'])} | {o['passed_runs']} / {o['runs']} | "
        f"{o['mean_tokens']:,.0f} | {o['mean_steps']:.1f} | {o['mean_seconds']:.1f} |",
        "",
        f"(k = {k}. pass@1: the chance one run succeeds. pass@k: at least one of k runs succeeds. **pass^k**: all k "
        "runs succeed, the measure of whether you can rely on it; unbiased estimates from the runs, averaged over tasks.)",
        "",
        f"**{len(always)}** task(s) passed every run, **{len(never)}** passed none, **{len(flaky)}** were flaky "
        f"(some runs passed, some failed){': ' + ', '.join(flaky) if flaky else ''}.",
    ]
    if o["failures"]:
        worst = max(o["failures"], key=o["failures"].get)
        lines.append(f"The most common failure: **{worst}** ({o['failures'][worst]} of "
                     f"{o['runs'] - o['passed_runs']} failed runs): {WHAT_IT_MEANS.get(worst, '')}.")
    lines += ["", "![reliability](reliability.png)", ""]
    if len(results["categories"]) > 1:
        lines += ["## By category", "", f"| category | tasks | pass@1 | pass@{k} | pass^{k} | failures |", "|---|---|---|---|---|---|"]
        for name, c in results["categories"].items():
            fails = ", ".join(f"{f} {v}" for f, v in c["failures"].items()) or "–"
            lines.append(f"| {name} | {c['tasks']} | {_pct(c['pass@1'])} | {_pct(c['pass@k'])} | {_pct(c['pass^k'])} | {fails} |")
        lines.append("")
    lines += ["## Failures by their first error", "",
              "Each failed run counts once, under the first thing that went wrong in it (a tool error the model "
              "later recovered from does not count).", "", "| class | runs | share of failed runs | what it means |",
              "|---|---|---|---|"]
    failed = o["runs"] - o["passed_runs"]
    for cls in FAILURE_CLASSES:
        count = o["failures"].get(cls, 0)
        if count or cls != "endpoint_error":
            lines.append(f"| `{cls}` | {count} | {_pct(count / failed) if failed else '–'} | {WHAT_IT_MEANS[cls]} |")
    lines += ["", "![failures](failures.png)", ""]
    if "simpleqa" in o:
        s = o["simpleqa"]
        lines += ["## Answer or abstain (SimpleQA grades)", "",
                  "| correct | incorrect | not attempted | overall correct | correct given attempted | F-score |",
                  "|---|---|---|---|---|---|",
                  f"| {s['correct']} | {s['incorrect']} | {s['not_attempted']} | {_pct(s['overall_correct'])} | "
                  f"{_pct(s['correct_given_attempted'])} | {_pct(s['f_score'])} |", "",
                  "A model that declines where the documents are silent and answers where they speak scores high on "
                  "both; `fabricated` counts confident answers to unanswerable questions.", ""]
    calls, failed, kinds = Counter(), Counter(), Counter()
    for r in results["runs"]:
        calls.update(r.get("calls_by_tool", {}))
        failed.update(r.get("failed_by_tool", {}))
        kinds.update(r.get("errors_by_kind", {}))
    lines += ["## Tool use", ""]
    if calls:
        with_calls = sum(r["tool_calls"] > 0 for r in results["runs"])
        lines += [f"{sum(calls.values())} tool calls in {with_calls} of {o['runs']} runs. Errors on the way, recovered "
                  "from or not: " + (", ".join(f"{k} {v}" for k, v in kinds.most_common()) or "none") + ".", "",
                  "| tool | calls | failed calls |", "|---|---|---|"]
        for name, count in calls.most_common():
            shown = "".join(ch for ch in name if ch.isprintable()).replace("|", "/")[:40] or "(no name)"
            lines.append(f"| `{shown}` | {count} | {failed.get(name, 0)} |")
    else:
        lines.append(f"No tool calls in any of the {o['runs']} runs.")
    lines.append("")
    lines += ["## Per task", "", f"| task | category | passed | pass@1 | pass@{k} | pass^{k} | failures | tokens | steps | s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(tasks, key=lambda t: (t["pass^k"], t["pass@1"])):
        fails = ", ".join(f"{f} {v}" for f, v in t["failures"].items()) or "–"
        lines.append(f"| {t['task']} | {t['category']} | {t['c']}/{t['n']} | {_pct(t['pass@1'])} | {_pct(t['pass@k'])} | "
                     f"{_pct(t['pass^k'])} | {fails} | {t['mean_tokens']:,.0f} | {t['mean_steps']:.1f} | {t['mean_seconds']:.1f} |")
    lines += ["", "![cost](cost.png)", "", "## One example of each failure", "",
              "The first run of each class, with the error that classified it; its `trace.jsonl` has every model call "
              "and tool result.", ""]
    seen = set()
    for r in results["runs"]:
        if r["failure"] and r["failure"] not in seen:
            seen.add(r["failure"])
            message = "".join(ch for ch in str(r.get("first_error") or r.get("detail") or "") if ch.isprintable() or ch == " ")
            message = " ".join(message.replace("|", "/").split())[:240]
            lines.append(f"- **{r['failure']}**: task `{r['task']}` run {r['run']} (`{r['dir']}`): {message}")
    if not seen:
        lines.append("- none: every run passed.")
    lines.append("")
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    print(write_report(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
