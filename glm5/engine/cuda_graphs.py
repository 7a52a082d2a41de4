"""CUDA graphs for engine steps: one graph replay instead of hundreds of kernel launches.

A step of a small model on a GPU is bound by launches and host work, not by the GPU: every layer is a few
dozen tiny kernels. `StepGraphs` captures the runner's whole forward for a step's shape once and replays it:

    shape             (sequences, tokens per sequence, context), each rounded up to a bucket:
      sequences       1, 2, 4, 8, 16, 24, 32, ... (the padding sequences write to the cache's scratch slot
                      and read only it)
      tokens          powers of two >= the most new tokens of a sequence: 1 for decode steps, the prompt (or
                      chunk) for prefill steps; a step of more than `max_tokens` padded tokens runs eagerly
      context         powers of two >= the longest context (at least 16); each row's slots are padded to it
                      and masked by its own positions
    layout            padded in place: sequence i's token j is row i * tokens + j; padding rows write to the
                      scratch slot and their outputs are never read
    one copy in       ids, positions, slots and the padded slot table travel in one int64 tensor

The captured forward is the runner's own with `StepInputs.static` set, its only differences being sync-free:
the top-k's tie rule (`lowest_position_ties_static`) and the MoE (`glm5.model.experts.run_experts(..., static=True)`). Since the context is
padded to its bucket, a step whose longest context is at most `index_topk` may take the sparse path, where all
visible keys are selected: the same keys, the same softmax. With MTP speculation a decode step is one whole
speculative cycle (`glm5.engine.speculative.verify_and_draft`: verify the drafts, accept, draft the next ones)
captured as one graph per (sequences, context) bucket; its tokens per sequence are k + 1.

On a device without CUDA graphs (the CPU), `capture=False` runs exactly the same static forward eagerly:
that is the fallback the tests compare with the ordinary eager engine, token for token. A capture that fails
warns once and leaves every later step to the eager path.

    llm = LLM(model.cuda())                  # graphs on by default on CUDA (cuda_graphs=False turns them off)
    llm = LLM(model, cuda_graphs=True)       # on a CPU: the static path without capture (tests)
    llm.graphs.capture_decode(max_context=4096)         # capture ahead (else each new shape captures on use)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from glm5.engine.runner import ModelRunner, StepInputs, static_step_inputs
from glm5.engine.speculative import cycle_batch, verify_and_draft

MIN_CONTEXT_BUCKET = 16


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8: the smallest list whose last bucket holds max_batch sequences."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b = b * 2 if b < 8 else b + 8
    return out + [b]


def pow2_bucket(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def context_bucket(length: int) -> int:
    """The smallest power of two >= length, at least MIN_CONTEXT_BUCKET."""
    return max(MIN_CONTEXT_BUCKET, pow2_bucket(length))


def cycle_inputs(seqs, k: int) -> tuple[list[int], list[list[int]], int]:
    """What a speculative cycle feeds each sequence: (first positions, [newest token, k drafts], the context
    bucket, which reaches the k - 1 chained drafts past the last draft)."""
    starts = [s.num_computed_tokens for s in seqs]
    tokens = [s.token_ids[a:] + s.draft_token_ids for s, a in zip(seqs, starts)]
    return starts, tokens, context_bucket(max(starts) + 2 * k)


def host_inputs(block_size: int, scratch: int, seqs, starts: list[int], counts: list[int], S: int, Q: int,
                T: int, tokens: list[list[int]] | None = None) -> torch.Tensor:
    """A static step's packed int64 inputs [3 S Q + S T] (ids | positions | slots | padded slot table; see the
    module docstring), built with numpy: per-token Python loops cost ~0.35 ms for a prefill of 8 x 128 tokens,
    a good part of a step that the GPU runs in about a millisecond. `tokens` overrides the ids fed (a sequence's
    newest token and its drafts); by default they are the sequence's own."""
    bs = block_size
    n_seqs = len(seqs)
    start = np.asarray(starts, dtype=np.int64)[:, None]
    count = np.asarray(counts, dtype=np.int64)[:, None]
    j = np.arange(Q, dtype=np.int64)[None, :]
    real = j < count  # [n, Q]
    positions = start + np.minimum(j, count - 1)  # padding rows: the last query's position
    nb = -(-T // bs)  # every position is below T, the context bucket
    tables = np.zeros((n_seqs, nb), dtype=np.int64)
    for i, seq in enumerate(seqs):
        row = seq.block_table[:nb]
        tables[i, : len(row)] = row
    slots = np.where(real, np.take_along_axis(tables, positions // bs, 1) * bs + positions % bs, scratch)
    ids = np.zeros((n_seqs, Q), dtype=np.int64)
    for i, (seq, a, n) in enumerate(zip(seqs, starts, counts)):
        ids[i, :n] = seq.token_ids[a : a + n] if tokens is None else tokens[i]
    t = np.arange(T, dtype=np.int64)
    ctx = tables[:, t // bs] * bs + t % bs  # beyond a row's position: masked, any slot will do
    packed = np.empty(3 * S * Q + S * T, dtype=np.int64)
    fields = packed[: 3 * S * Q].reshape(3, S, Q)
    fields[0], fields[1], fields[2] = 0, 0, scratch  # padding sequences: token 0 at position 0, scratch
    fields[0, :n_seqs], fields[1, :n_seqs], fields[2, :n_seqs] = ids, positions, slots
    table = packed[3 * S * Q :].reshape(S, T)
    table[:] = scratch
    table[:n_seqs] = ctx
    return torch.from_numpy(packed)


def unpack(packed: torch.Tensor, S: int, Q: int, T: int) -> tuple[torch.Tensor, ...]:
    """`host_inputs`' packed tensor -> views (ids [N], positions [N], slots [N], slot table [S, T]), N = S Q."""
    N = S * Q
    return packed[:N], packed[N : 2 * N], packed[2 * N : 3 * N], packed[3 * N :].view(S, T)


@dataclass
class _Entry:
    shape: tuple[int, int, int]  # (sequences, tokens per sequence, context)
    packed: torch.Tensor  # [3N + S*T] int64: ids | positions | slots | slot table
    inputs: StepInputs
    body: object  # the static forward (run eagerly when not captured)
    graph: object | None = None  # torch.cuda.CUDAGraph
    out: torch.Tensor | None = None  # the captured forward's output [N, hidden]


class StepGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, scratch_slot: int, capture: bool,
                 max_tokens: int = 1024, max_prefill_graphs: int = 32, num_speculative_tokens: int = 0) -> None:
        self.runner = runner
        self.k = num_speculative_tokens  # drafts per sequence of the speculative cycles captured
        self.buckets = batch_buckets(max_batch)
        self.scratch_slot = scratch_slot
        self.capture_enabled = capture
        self.max_tokens = max_tokens
        self.max_prefill_graphs = max_prefill_graphs
        self.num_replays = 0
        self.num_cycles = 0  # speculative cycles run (replayed or, uncaptured, run as they are)
        self.failed: str | None = None  # why capture failed (then every step runs eagerly)
        self.reset()
        runner.graphs = self

    def reset(self) -> None:
        """Drop every graph (they read the runner's fused weights: after `refresh_weights`, stale)."""
        self.entries: dict[tuple[int, int, int], _Entry] = {}
        self.cycles: dict[tuple[int, int], _Entry] = {}  # speculative cycles by (sequences, context)
        self.pool = None

    def shape(self, counts: list[int], contexts: list[int]) -> tuple[int, int, int] | None:
        """The bucketed shape of a step feeding counts[i] tokens to sequence i, whose context then ends at
        contexts[i]; None when no graph would replay it (more sequences than the last bucket, or over
        max_tokens padded tokens)."""
        S = next((b for b in self.buckets if b >= len(counts)), None)
        Q = pow2_bucket(max(counts))
        if S is None or S * Q > self.max_tokens:
            return None
        return S, Q, context_bucket(max(contexts))

    def handles(self, batch) -> bool:
        """No drafts, a bucket for its sequences, at most max_tokens padded tokens, and a graph for its shape
        already made or room for one more: decode shapes are few (batch buckets x log2 of the context) and
        always get one; prefill shapes are many, and at most max_prefill_graphs are kept."""
        if self.failed is not None or any(batch.num_draft_tokens):
            return False
        contexts = [s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens)]
        shape = self.shape(batch.num_new_tokens, contexts)
        if shape is None:
            return False
        if shape in self.entries or shape[1] == 1:
            return True
        return sum(q > 1 for _, q, _ in self.entries) < self.max_prefill_graphs

    def handles_speculative(self, batch) -> bool:
        """A decode step in which every sequence verifies k drafts and none has a logits processor (the cycle
        takes the plain greedy choice), a bucket for its sequences, and at most max_tokens padded tokens."""
        return (self.failed is None and cycle_batch(batch, self.k)
                and self.shape([self.k + 1] * len(batch.seqs), [1]) is not None)

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def run_speculative(self, seqs) -> list[list[int]] | None:
        """One speculative cycle (`glm5.engine.speculative.verify_and_draft`) replayed from its graph: feed each
        sequence's newest token and its k drafts -> per sequence [k + 1 targets, drafts accepted, k next
        drafts]; None when the capture failed just now (the caller runs the step eagerly)."""
        n, Q = len(seqs), self.k + 1  # exactly k + 1 rows a sequence (the cycle's layout)
        starts, tokens, T = cycle_inputs(seqs, self.k)
        S = self.shape([Q] * n, [1])[0]
        entry = self.cycles.get((S, T)) or self._build(S, Q, T, speculative=True)
        if entry is None:
            return None
        self.num_cycles += 1
        packed = host_inputs(self.runner.block_size, self.scratch_slot, seqs, starts, [Q] * n, S, Q, T, tokens=tokens)
        return self._replay(entry, packed)[:n].tolist()

    def _replay(self, entry: _Entry, packed: torch.Tensor) -> torch.Tensor:
        """Copy a step's packed inputs in and replay its graph (or, uncaptured, run its body) -> its output."""
        entry.packed.copy_(packed)
        if entry.graph is None:
            return entry.body()
        entry.graph.replay()
        self.num_replays += 1
        return entry.out

    @torch.no_grad()
    def run(self, seqs, counts: list[int] | None = None) -> tuple[StepInputs, torch.Tensor]:
        """Feed tokens [num_computed, num_computed + counts[i]) of each sequence (default: its newest one)
        -> (the step's inputs, final hidden states [S * Q, hidden] in the padded layout: row i * Q + j)."""
        counts = counts or [1] * len(seqs)
        starts = [s.num_computed_tokens for s in seqs]
        shape = self.shape(counts, [a + n for a, n in zip(starts, counts)])
        entry = None if shape is None else self.entries.get(shape) or self._build(*shape)
        if entry is None:  # no graph fits this step, or capture failed just now: it runs eagerly
            inputs = self.runner.prepare(seqs, starts, counts)
            return inputs, self.runner.forward(inputs)
        packed = host_inputs(self.runner.block_size, self.scratch_slot, seqs, starts, counts, *shape)
        return entry.inputs, self._replay(entry, packed)

    # ------------------------------------------------------------------ capture
    @torch.no_grad()
    def _build(self, S: int, Q: int, T: int, speculative: bool = False) -> _Entry | None:
        runner = self.runner
        device = runner.device
        N = S * Q
        packed = torch.zeros(3 * N + S * T, dtype=torch.long, device=device)
        # a valid step to warm up and capture on: every row writes and reads the scratch slot
        packed[2 * N :] = self.scratch_slot
        ids, positions, slots, ctx = unpack(packed, S, Q, T)
        inputs = static_step_inputs(ids, positions, slots, ctx, runner.index_topk)
        t = torch.arange(T, device=device).view(1, 1, T)

        def body() -> torch.Tensor:
            if speculative:  # the cycle builds its own inputs from the same packed views
                return verify_and_draft(runner, ids, positions, slots, ctx, Q - 1)
            inputs.visible = t <= positions.view(S, Q, 1)  # computed inside the graph from the positions
            inputs.rotation = None  # likewise the RoPE matrices (never a capture-time leftover)
            return runner.forward(inputs)

        entry = _Entry((S, Q, T), packed, inputs, body)
        if self.capture_enabled:
            try:
                self._capture(entry)
            except RuntimeError as err:  # a fast path must never take the engine down: warn, run eagerly
                self.failed = f"{type(err).__name__}: {err}"
                warnings.warn(f"CUDA graph capture failed, running steps without graphs: {self.failed}", stacklevel=2)
                return None
        if speculative:
            self.cycles[(S, T)] = entry
        else:
            self.entries[entry.shape] = entry
        return entry

    def _capture(self, entry: _Entry) -> None:
        device, body = self.runner.device, entry.body
        self.runner.build_fused()  # the fused weights are made once, outside any graph
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up off the capture (lazy inits, cuBLAS workspaces)
            for _ in range(2):
                body()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            entry.out = body()
        self.pool = graph.pool()
        entry.graph = graph

    def capture(self, num_seqs: int, tokens_per_seq: int, context: int) -> bool:
        """Make the graph for steps of this shape now (bucketed) instead of on first use. -> made or present
        (False for a shape no step would replay: more sequences than the last bucket, or over max_tokens)."""
        shape = self.shape([tokens_per_seq] * num_seqs, [context])
        if shape is None:
            return False
        if shape not in self.entries and self.failed is None:
            self._build(*shape)
        return shape in self.entries

    def capture_decode(self, max_context: int, batch_sizes: list[int] | None = None) -> int:
        """Every decode shape up to max_context for these batch sizes (default: all buckets). -> graphs held."""
        T = MIN_CONTEXT_BUCKET
        while True:
            for n in batch_sizes or self.buckets:
                self.capture(n, 1, T)
            if T >= max_context:
                break
            T *= 2
        return len(self.entries)

