"""Next-token sampling for a batch of sequences, each with its own SamplingParams.

Order (as vLLM): logits processors -> penalties (repetition on prompt + output, presence / frequency on output) -> temperature ->
top-k -> top-p -> min-p -> draw. Greedy rows (temperature 0) take the argmax of the penalized logits. A seeded
sequence draws from its own torch.Generator, so the same seed gives the same tokens whatever else is in the
batch. Logprobs are those of the model's raw distribution (log_softmax of the logits, before any processing).
"""

from __future__ import annotations

import torch

from glm5.engine.sequence import Sequence, TokenLogprob


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [S, V] (fp32, modified in place for rows with penalties)."""
    V = logits.shape[-1]
    for i, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(V, dtype=torch.bool, device=logits.device)
            seen[torch.tensor(seq.token_ids, dtype=torch.long, device=logits.device)] = True
            penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, penalized, row))
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=V).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def apply_processors(logits: torch.Tensor, seqs: list[Sequence], prefixes: list[list[int]] | None = None) -> torch.Tensor:
    """logits [S, V] -> the same after each row's sequence's logits processors (a copy when any has some).

    Row i is processed as the next token after `prefixes[i]` (default: the sequence's output so far); speculative
    decoding passes an output extended by the drafts before that row."""
    if not any(s.params.logits_processors for s in seqs):
        return logits
    logits = logits.clone()
    for i, seq in enumerate(seqs):
        prefix = seq.output_token_ids if prefixes is None else prefixes[i]
        for processor in seq.params.logits_processors:
            logits[i] = processor(prefix, logits[i])
    return logits


def processed_probs(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One row's sampling distribution after temperature, top-k, top-p and min-p. logits [V] -> probs [V]."""
    p = seq.params
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [S, V] fp32, one row per sequence -> the next token of each, and its logprobs if asked."""
        raw = logits
        logits = apply_processors(logits, seqs)
        if any(s.params.has_penalties for s in seqs):
            logits = apply_penalties(logits.clone(), seqs)
        tokens = logits.max(dim=-1).indices.tolist()  # greedy rows keep this (max is ~4x faster than argmax on CPU)
        for i, seq in enumerate(seqs):
            if seq.params.greedy:
                continue
            probs = processed_probs(logits[i], seq)
            # exponential race: argmax(p / E), E ~ Exp(1), is a draw from p; drawn from the sequence's generator
            if seq.generator is not None:
                # a seeded request draws on the CPU: the same seed gives the same text on any device
                noise = torch.empty(probs.shape).exponential_(generator=seq.generator).to(probs.device)
            else:
                noise = torch.empty_like(probs).exponential_()
            tokens[i] = int((probs / noise).argmax())
        return tokens, self.logprobs(raw, seqs, tokens)

    @staticmethod
    def logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
        wanted = [s.params.logprobs for s in seqs]
        if all(w is None for w in wanted):
            return [None] * len(seqs)
        logprobs = torch.log_softmax(logits, dim=-1)
        out: list[TokenLogprob | None] = []
        for i, n in enumerate(wanted):
            if n is None:
                out.append(None)
                continue
            top: list[tuple[int, float]] = []
            if n:
                values, ids = logprobs[i].topk(n)
                top = list(zip(ids.tolist(), values.tolist()))
            out.append(TokenLogprob(tokens[i], float(logprobs[i, tokens[i]]), top))
        return out
