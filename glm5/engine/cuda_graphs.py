"""CUDA graphs for decode steps: one graph replay instead of hundreds of kernel launches per token.

A decode step of a small model on a GPU is bound by launches and host work, not by the GPU: every layer is
a few dozen tiny kernels. `DecodeGraphs` captures the runner's whole forward for a decode step (one new
token per sequence, no drafts) once per (batch bucket, context bucket) and replays it:

    batch buckets     1, 2, 4, 8, 16, 24, 32, ...: a step of n sequences runs the smallest bucket >= n;
                      the padding rows write to the cache's scratch slot and read only it
    context buckets   powers of two >= the longest context of the step (at least 16): every row's cache
                      slots are padded to that width and masked by its own length
    one copy in       ids, positions, slots, lengths and the padded slot table travel in one int64 tensor

The captured forward is the runner's own with `StepInputs.static` set, its only two differences being
sync-free: the top-k's tie rule (`lowest_position_ties_static`) and the MoE (`runner.moe_static`). Since the
context is padded to its bucket, a step whose longest context is at most `index_topk` may take the sparse
path, where all visible keys are selected: the same keys, the same softmax.

On a device without CUDA graphs (the CPU), `capture=False` runs exactly the same static forward eagerly:
that is the fallback the tests compare with the ordinary eager engine, token for token.

    llm = LLM(model.cuda())                  # graphs on by default on CUDA (cuda_graphs=False turns them off)
    llm = LLM(model, cuda_graphs=True)       # on a CPU: the static path without capture (tests)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from glm5.engine.runner import ModelRunner, StepInputs

MIN_CONTEXT_BUCKET = 16


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8: the smallest list whose last bucket holds max_batch sequences."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b = b * 2 if b < 8 else b + 8
    return out + [b]


def context_bucket(length: int) -> int:
    """The smallest power of two >= length, at least MIN_CONTEXT_BUCKET."""
    return max(MIN_CONTEXT_BUCKET, 1 << (max(length, 1) - 1).bit_length())


@dataclass
class _Entry:
    batch: int
    context: int
    packed: torch.Tensor  # [4B + B*T] int64: ids | positions | slots | lengths | slot table
    inputs: StepInputs
    graph: object | None  # torch.cuda.CUDAGraph
    out: torch.Tensor | None  # the captured forward's output [B, hidden]
    body: object  # the static forward (run eagerly when not captured)


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, scratch_slot: int, capture: bool) -> None:
        self.runner = runner
        self.buckets = batch_buckets(max_batch)
        self.scratch_slot = scratch_slot
        self.capture = capture
        self.entries: dict[tuple[int, int], _Entry] = {}
        self.pool = None
        self.num_replays = 0
        self.failed: str | None = None  # why capture failed (then every step decodes eagerly)

    def handles(self, batch) -> bool:
        """A decode step with one new token per sequence, no drafts, and a bucket for its size."""
        return (self.failed is None and not batch.is_prefill and len(batch.seqs) <= self.buckets[-1]
                and all(n == 1 for n in batch.num_new_tokens) and not any(batch.num_draft_tokens))

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def run(self, seqs) -> tuple[StepInputs, torch.Tensor]:
        """Feed each sequence's newest token -> (the step's inputs, final hidden states [n, hidden])."""
        n = len(seqs)
        B = next(b for b in self.buckets if b >= n)
        lengths = [s.num_computed_tokens + 1 for s in seqs]
        T = context_bucket(max(lengths))
        entry = self.entries.get((B, T)) or self._build(B, T)
        if entry is None:  # capture failed just now: this step and the rest run eagerly
            inputs = self.runner.prepare(seqs, [s.num_computed_tokens for s in seqs], [1] * n)
            return inputs, self.runner.forward(inputs)
        entry.packed.copy_(self._host_inputs(seqs, lengths, B, T))
        if entry.graph is not None:
            entry.graph.replay()
            self.num_replays += 1
            out = entry.out
        else:
            out = entry.body()
        return entry.inputs, out[:n]

    def _host_inputs(self, seqs, lengths: list[int], B: int, T: int) -> torch.Tensor:
        bs = self.runner.block_size
        n = len(seqs)
        positions = [length - 1 for length in lengths]
        ids = [s.token_ids[p] for s, p in zip(seqs, positions)]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
        pad = B - n
        head = torch.tensor(ids + [0] * pad + positions + [0] * pad + slots + [self.scratch_slot] * pad
                            + lengths + [1] * pad, dtype=torch.long)
        nb = T // bs if T % bs == 0 else -(-T // bs)
        tables = torch.tensor([s.block_table[:nb] + [0] * (nb - len(s.block_table[:nb])) for s in seqs], dtype=torch.long)
        t = torch.arange(T)
        table = torch.full((B, T), self.scratch_slot, dtype=torch.long)
        table[:n] = tables[:, t // bs] * bs + t % bs  # beyond a row's length: masked, any slot will do
        return torch.cat([head, table.view(-1)])

    # ------------------------------------------------------------------ capture
    @torch.no_grad()
    def _build(self, B: int, T: int) -> _Entry | None:
        runner = self.runner
        device = runner.device
        packed = torch.zeros(4 * B + B * T, dtype=torch.long, device=device)
        # a valid step to warm up and capture on: every row writes and reads the scratch slot
        dummy = torch.cat([torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long),
                           torch.full((B,), self.scratch_slot), torch.ones(B, dtype=torch.long),
                           torch.full((B * T,), self.scratch_slot)])
        packed.copy_(dummy)
        rows = torch.arange(B, device=device)
        inputs = StepInputs(
            input_ids=packed[:B], positions=packed[B : 2 * B], slot_mapping=packed[2 * B : 3 * B],
            pad_index=rows.view(B, 1), unpad_index=rows, ctx_slots=packed[4 * B :].view(B, T), visible=None,
            sparse=T > runner.index_topk, query_starts=list(range(B)), query_counts=[1] * B, static=True,
        )
        lengths = packed[3 * B : 4 * B].view(B, 1, 1)
        t = torch.arange(T, device=device).view(1, 1, T)

        def body() -> torch.Tensor:
            inputs.visible = t < lengths  # computed inside the graph from the lengths copied in
            inputs.rotation = None  # likewise the RoPE matrices (never a capture-time leftover)
            return runner.forward(inputs)

        entry = _Entry(B, T, packed, inputs, None, None, body)
        if self.capture:
            try:
                self._capture(entry)
            except RuntimeError as err:  # a fast path must never take the engine down: warn, decode eagerly
                self.failed = f"{type(err).__name__}: {err}"
                warnings.warn(f"CUDA graph capture failed, decoding without graphs: {self.failed}", stacklevel=2)
                return None
        self.entries[(B, T)] = entry
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

    @torch.no_grad()
    def capture_all(self, max_context: int, batch_sizes: list[int] | None = None) -> int:
        """Capture ahead of time every bucket up to max_context (so no step pays for a capture). -> graphs."""
        T = MIN_CONTEXT_BUCKET
        contexts = []
        while True:
            contexts.append(T)
            if T >= max_context:
                break
            T *= 2
        for n in batch_sizes or self.buckets:
            B = next(b for b in self.buckets if b >= n)
            for T in contexts:
                if (B, T) not in self.entries and self.failed is None:
                    self._build(B, T)
        return len(self.entries)
