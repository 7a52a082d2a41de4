"""Reliability over repeated runs, and why runs fail.

With n runs of a task and c successes (unbiased estimators, Chen et al. 2021 for pass@k, τ-bench for pass^k):
    pass@k = 1 - C(n-c, k) / C(n, k)      at least one of k runs succeeds
    pass^k = C(c, k) / C(n, k)             all k runs succeed (consistency)
Both equal c/n at k = 1; a suite's figure is the mean over its tasks.

Every failed run gets one class, from its FIRST error in the trace:
    malformed_call           a tool call the endpoint or the loop could not decode (arguments not JSON,
                             tool-call syntax left in the text, no name)
    unknown_tool             a call to a tool that does not exist
    bad_arguments            arguments that do not fit the tool's schema
    tool_error_unrecovered   a tool failed and no later call of that tool succeeded (recovered tool errors
                             are part of normal work and do not count)
    step_limit               still calling tools after the step limit
    timeout                  the run's wall-time limit (or a model call's) ran out
    endpoint_error           the endpoint failed (HTTP error, unreachable): not the model's fault
and, with no error on the way, from the verifier:
    wrong_answer, fabricated (answered or called where nothing fits), wrong_abstention (declined an
    answerable task).
"""

from __future__ import annotations

from math import comb

FAILURE_CLASSES = ("malformed_call", "unknown_tool", "bad_arguments", "tool_error_unrecovered", "step_limit",
                   "wrong_answer", "fabricated", "wrong_abstention", "timeout", "endpoint_error")

_ERROR_CLASS = {"malformed_call": "malformed_call", "unknown_tool": "unknown_tool", "bad_arguments": "bad_arguments",
                "tool_error": "tool_error_unrecovered", "step_limit": "step_limit", "timeout": "timeout",
                "model_error": "endpoint_error"}


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_hat_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass^k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return comb(c, k) / comb(n, k)


def counted_errors(errors: list[dict], calls_ok: list[tuple[int, str, bool]] | None = None) -> list[dict]:
    """The errors that count for the taxonomy: a tool error is dropped when a later call of the same tool
    succeeded. `calls_ok` is [(position in the trace, tool name, ok)] of every tool result."""
    counted = []
    for e in errors:
        if e.get("kind") == "tool_error" and calls_ok is not None:
            where = e.get("position", -1)
            if any(pos > where and name == e.get("tool") and ok for pos, name, ok in calls_ok):
                continue
        counted.append(e)
    return counted


def classify(errors: list[dict], verdict_kind: str | None, calls_ok=None) -> str:
    """The failure class of a failed run: its first counted error, else the verifier's."""
    for e in counted_errors(errors, calls_ok):
        if e.get("kind") in _ERROR_CLASS:
            return _ERROR_CLASS[e["kind"]]
    return verdict_kind or "wrong_answer"
