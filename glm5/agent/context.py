"""Context management: what of the conversation the model sees on its next call.

The full conversation stays in memory and in the trace; `fit_context` returns the view sent to the model:
- the system prompt, the task, and every assistant turn (its reasoning, text and tool calls) are kept;
- the tool results of the latest round (after the last assistant message) are kept in full;
- older tool results, oldest first, are cut to a short head (`summarize`) while the estimate is over the
  budget, then replaced by a one-line note if it is still over.
Tool messages are never removed (an OpenAI-compatible endpoint expects a result for every tool call id).
"""

from __future__ import annotations

import json

from glm5.agent.client import estimate_tokens

SUMMARY_CHARS = 400


def message_tokens(message: dict) -> int:
    return estimate_tokens(json.dumps(message, ensure_ascii=False)) + 4


def summarize(content: str, keep: int = SUMMARY_CHARS) -> str:
    """An older tool result cut to its head, saying how much was left out."""
    if len(content) <= keep:
        return content
    return f"{content[:keep]}\n[older tool result shortened: {len(content) - keep} of {len(content)} characters left out]"


def fit_context(messages: list[dict], budget_tokens: int) -> tuple[list[dict], int]:
    """(messages to send, how many tool results were shortened or dropped) for a token budget."""
    total = sum(message_tokens(m) for m in messages)
    if total <= budget_tokens:
        return messages, 0
    last_assistant = max((k for k, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    older = [k for k, m in enumerate(messages) if m.get("role") == "tool" and k < last_assistant]
    view = list(messages)
    changed = set()
    for shorten in (summarize, lambda c: f"[older tool result dropped: {len(c)} characters]"):
        for k in older:
            if total <= budget_tokens:
                break
            content = str(messages[k].get("content") or "")
            new = shorten(content)
            if new == str(view[k].get("content") or "") or len(new) >= len(str(view[k].get("content") or "")):
                continue
            before = message_tokens(view[k])
            view[k] = {**view[k], "content": new}
            total += message_tokens(view[k]) - before
            changed.add(k)
    return view, len(changed)
