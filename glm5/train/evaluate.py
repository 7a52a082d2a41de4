"""Evaluation of a trained model: held-out loss, greedy generation, tool-call validity and task accuracy.

    from glm5.train.evaluate import heldout_loss, generate, tool_call_eval
    loss = heldout_loss(model, rows)                         # mean next-token loss over labelled tokens
    texts = generate(model, tokenizer, prompts, max_new_tokens=40)
    result = tool_call_eval(model, tokenizer, tasks)         # {"validity", "tool_accuracy", "accuracy", "samples"}

Generation here is the plain loop (the whole sequence re-run per new token, prompts left-padded into one
batch): enough for a few dozen short answers; the engine (glm5/engine) is the fast path.
"""

from __future__ import annotations

import contextlib

import torch

from glm5.chat import parse_output, render_messages
from glm5.train.data import PackedRows
from glm5.train.losses import lm_loss_sum


@contextlib.contextmanager
def masked_sparse_attention(model):
    """Run DSA's top-k as a mask over dense latent attention while inside (same math; far faster on a CPU at
    a few hundred tokens, see MLAttention.sparse_as_mask)."""
    from glm5.model.mla import MLAttention

    layers = [m for m in model.modules() if isinstance(m, MLAttention)]
    previous = [m.sparse_as_mask for m in layers]
    for m in layers:
        m.sparse_as_mask = True
    try:
        yield model
    finally:
        for m, value in zip(layers, previous):
            m.sparse_as_mask = value


@torch.no_grad()
def heldout_loss(model, rows: PackedRows, batch_size: int = 8, max_rows: int | None = None) -> float:
    """Mean next-token loss over the labelled tokens of `rows` (the first max_rows of them)."""
    model.eval()
    if max_rows is not None:
        rows = PackedRows(rows.ids[:max_rows], rows.labels[:max_rows])
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        ids, labels = rows.ids[start : start + batch_size], rows.labels[start : start + batch_size]
        with masked_sparse_attention(model):
            logits = model(ids).logits
        loss_sum, n = lm_loss_sum(logits, labels)
        total, count = total + float(loss_sum), count + n
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48,
             stop_strings: tuple[str, ...] = ("</tool_call>",)) -> list[str]:
    """Greedy continuations of `prompts` (text with special tokens), stopping at the tokenizer's EOS ids
    or once a stop string has been written. Returns the new text of each, specials kept."""
    model.eval()
    encoded = [tokenizer.encode(p, allow_special=True) for p in prompts]
    eos = set(tokenizer.eos_token_ids)
    pad = tokenizer.pad_token_id or 0
    B, longest = len(encoded), max(map(len, encoded))
    ids = torch.full((B, longest), pad, dtype=torch.long)
    mask = torch.zeros(B, longest, dtype=torch.long)
    for row, tokens in enumerate(encoded):  # left padding: every prompt ends at the last column
        ids[row, longest - len(tokens) :] = torch.tensor(tokens)
        mask[row, longest - len(tokens) :] = 1
    new = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with masked_sparse_attention(model):
            logits = model(ids, position_ids=positions, attention_mask=mask).logits[:, -1]
        next_ids = logits.argmax(-1)
        for row in range(B):
            if done[row]:
                continue
            token = int(next_ids[row])
            if token in eos:
                done[row] = True
                continue
            new[row].append(token)
            if any(tokenizer.decode(new[row][-8:]).endswith(s) for s in stop_strings):
                done[row] = True
        if all(done):
            break
        ids = torch.cat([ids, next_ids.unsqueeze(1)], dim=1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
    return [tokenizer.decode(tokens) for tokens in new]


def tool_call_eval(model, tokenizer, tasks: list[dict], max_new_tokens: int = 48) -> dict:
    """validity: share of answers whose tool calls all parse and fit the schema (and that make one);
    tool_accuracy: share whose first valid call names the expected tool (choosing the tool from the request);
    accuracy: share whose first call has exactly the expected name and arguments (also copying them)."""
    prompts = [render_messages(t["messages"], t["tools"]) for t in tasks]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    valid = right_tool = correct = 0
    samples = []
    for task, text in zip(tasks, outputs):
        parsed = parse_output(text, task["tools"])
        ok = bool(parsed.tool_calls) and all(call.valid for call in parsed.tool_calls)
        tool = ok and parsed.tool_calls[0].name == task["expected"]["name"]
        right = tool and parsed.tool_calls[0].arguments == task["expected"]["arguments"]
        valid += ok
        right_tool += tool
        correct += right
        samples.append({"request": task["messages"][-1]["content"], "output": text, "valid": ok,
                        "right_tool": tool, "correct": right})
    n = max(len(tasks), 1)
    return {"validity": valid / n, "tool_accuracy": right_tool / n, "accuracy": correct / n, "samples": samples}
