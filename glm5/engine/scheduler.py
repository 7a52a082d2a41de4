"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step is either a prefill step (prompts, cut into chunks so no step exceeds `max_num_batched_tokens`)
or a decode step (every running sequence advances by one token, plus its MTP drafts when speculating).
Prefill has priority, so a new request starts as soon as there is room; requests join and leave the running
batch between steps. When the cache has no block for a decode step, the most recently admitted sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later (its full
blocks usually come back from the prefix cache).

A sequence can also be suspended: taken out of the batch with its blocks kept, and resumed later where it
stopped (RL's partial rollouts, continued by the same engine after a weight update, skip re-prefilling what
they have). Suspended sequences hold blocks only while nothing else needs them: when a step cannot get a
block, the oldest suspended sequence gives its blocks back first, and when resumed is recomputed like a
preempted one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from glm5.engine.block_manager import BlockManager
from glm5.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # per sequence, tokens fed this step (drafts included)
    is_prefill: bool
    num_draft_tokens: list[int] = field(default_factory=list)  # per sequence, drafts among the new tokens

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
        num_speculative_tokens: int = 0,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_speculative_tokens = num_speculative_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted: own blocks (prefilling or decoding)
        self.suspended: dict[int, Sequence] = {}  # id -> out of the batch, blocks kept (oldest first)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _detach(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        self._detach(seq)
        self.suspended.pop(id(seq), None)
        self.block_manager.free(seq)

    def suspend(self, seq: Sequence) -> None:
        """Take `seq` out of the batch, keeping its blocks (and what they hold) for `resume`."""
        self._detach(seq)
        seq.status = SequenceStatus.WAITING
        seq.draft_token_ids = []
        self.suspended[id(seq)] = seq

    def resume(self, seq: Sequence) -> None:
        """Back into the batch: straight to decoding when only its last sampled token is pending, else first in
        the queue (the rest of its prefill, or all of it when its blocks were reclaimed meanwhile)."""
        self.suspended.pop(id(seq), None)  # absent: its blocks were reclaimed
        if seq.block_table and seq.num_pending_tokens == 1 and len(self.running) < self.max_num_seqs:
            seq.status = SequenceStatus.RUNNING  # only its last token to feed: the next decode step takes it
            self.running.append(seq)
        else:
            self.waiting.appendleft(seq)

    def _reclaim(self, seq: Sequence, num_tokens: int) -> bool:
        """Free suspended sequences' blocks (oldest first) until `seq` can have slots for num_tokens."""
        bm = self.block_manager
        while not bm.can_allocate(seq, num_tokens) and self.suspended:
            bm.free(self.suspended.pop(next(iter(self.suspended))))
        return bm.can_allocate(seq, num_tokens)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        if batch is not None:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        seqs, counts = [], []
        # partially prefilled sequences first (chunked prefill), then new ones in arrival order
        for seq in [s for s in self.running if s.num_pending_tokens > 1]:
            if budget == 0:
                break
            n = min(seq.num_pending_tokens, budget)
            if not self._reclaim(seq, seq.num_computed_tokens + n):
                break
            bm.allocate(seq, seq.num_computed_tokens + n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                bm.match_prefix(seq)
            n = min(seq.num_pending_tokens, budget)
            # keep room for the first decode step of the running sequences
            if not self._reclaim(seq, seq.num_computed_tokens + n):
                if not self.running and not seqs:
                    bm.free(seq)  # nothing else holds blocks: shrink the chunk to what fits
                    bm.match_prefix(seq)
                    fit = bm.num_free_blocks * bm.block_size + len(seq.block_table) * bm.block_size
                    n = min(n, fit - seq.num_computed_tokens)
                    if n <= 0:
                        break
                else:
                    bm.free(seq)
                    break
            bm.allocate(seq, seq.num_computed_tokens + n)
            bm.prefix_queries += len(seq.token_ids)
            bm.prefix_hits += seq.num_computed_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        if not seqs:
            return None
        return ScheduledBatch(seqs, counts, is_prefill=True, num_draft_tokens=[0] * len(seqs))

    def _schedule_decode(self) -> ScheduledBatch | None:
        bm = self.block_manager
        seqs, counts, drafts = [], [], []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            k = len(seq.draft_token_ids)
            # slots for the last token and its drafts, and for the MTP's chained drafts after them
            need = len(seq.token_ids) + 2 * k
            while not self._reclaim(seq, need):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, need)
                seqs.append(seq)
                counts.append(1 + k)
                drafts.append(k)
        if not seqs:
            return None
        return ScheduledBatch(seqs, counts, is_prefill=False, num_draft_tokens=drafts)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.draft_token_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
