"""MTP speculative decoding: the model's own multi-token-prediction layer drafts, the main model verifies.

The MTP layer at position p reads the main model's final hidden state at p and the embedding of token p+1,
and predicts token p+2. It has its own latent cache (the layer after the main stack in LatentKVCache).

After every step, for each sequence the MTP layer runs over the positions that step computed (their hidden
states are at hand and their next tokens now known), which fills its cache and, at the last position,
drafts the token after the newly sampled one. With k > 1 the MTP layer is chained on its own output for the
next k - 1 drafts. The next decode step feeds [last token, drafts] to the main model at once; drafts are
accepted while they equal the main model's greedy choice, and the first mismatch is replaced by that choice,
so greedy output is exactly what decoding without speculation gives. Only greedy sequences without
penalties or logprobs speculate; the others decode one token per step in the same batch. Logits processors
marked `stateless = True` (a pure function of the output ids and the logits, e.g. logit_bias) do not stop a
sequence from speculating: they are applied to each draft and each verified row with the output extended by
the drafts before it, so the accepted tokens are still exactly the processed greedy choices.

That is the eager form: a verify forward, then an MTP forward and an lm_head per draft, each with its own inputs
built on the host. `verify_and_draft` is the same cycle as one static forward (no host sync), which a compiled
CPU step (glm5/engine/compiled.py) or a CUDA graph (glm5/engine/cuda_graphs.py) runs in one call when every
sequence of a decode step verifies k drafts without logits processors; it takes the same drafts.
"""

from __future__ import annotations

import dataclasses

import torch

from glm5.engine.block_manager import BlockManager
from glm5.engine.runner import static_step_inputs
from glm5.engine.sampler import apply_processors


def verify_greedy(logits: torch.Tensor, drafts: list[int]) -> tuple[int, list[int]]:
    """logits [1 + k, V] at [last token, drafts...] -> (drafts accepted, tokens to append).

    The tokens are the accepted drafts followed by the main model's own choice after them (the bonus token)."""
    return accept_drafts(logits.max(dim=-1).indices.tolist(), drafts)


def accept_drafts(targets: list[int], drafts: list[int]) -> tuple[int, list[int]]:
    """The same on the main model's greedy choices at [last token, drafts...] (1 + k of them)."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return accepted, drafts[:accepted] + [targets[accepted]]


def cycle_batch(batch, k: int) -> bool:
    """A decode step that one `verify_and_draft` call can run: every sequence verifies k drafts and none has a
    logits processor (the cycle takes the plain greedy choice; processed rows are verified eagerly)."""
    return (k > 0 and not batch.is_prefill and all(d == k for d in batch.num_draft_tokens)
            and not any(s.params.logits_processors for s in batch.seqs))


def can_speculate(seq) -> bool:
    p = seq.params
    return (p.greedy and not p.has_penalties and p.logprobs is None
            and all(getattr(processor, "stateless", False) for processor in p.logits_processors))


class MTPDrafter:
    def __init__(self, runner, block_manager: BlockManager, num_speculative_tokens: int) -> None:
        self.runner = runner
        self.block_manager = block_manager
        self.k = num_speculative_tokens

    def may_draft(self, seq) -> bool:
        """Whether `seq` drafts for its next step: live, greedy without penalties, prompt complete, and room in the
        cache for the drafts and the chained MTP positions after them (taken now: earlier drafters of the same
        step use up free blocks)."""
        need = len(seq.token_ids) + 2 * self.k
        if (seq.finish_reason is None and can_speculate(seq) and seq.num_pending_tokens == 1
                and self.block_manager.can_allocate(seq, need)):
            self.block_manager.allocate(seq, need)
            return True
        return False

    @torch.no_grad()
    def after_step(self, batch, inputs, hidden: torch.Tensor, computed_before: list[int]) -> None:
        """Run the MTP layer over this step's computed positions; set `draft_token_ids` on the sequences."""
        seqs, starts, counts, tokens, rows = [], [], [], [], []
        for i, seq in enumerate(batch.seqs):
            if seq.finish_reason is not None:
                continue  # leaving: neither its MTP cache nor drafts are needed
            start, stop = computed_before[i], seq.num_computed_tokens  # positions [start, stop) now cached
            n = stop - start
            if n <= 0:
                continue
            row = inputs.query_starts[i]
            seqs.append(seq)
            starts.append(start)
            counts.append(n)
            tokens.append(seq.token_ids[start + 1 : stop + 1])  # the token after each position
            rows.extend(range(row, row + n))
        if not seqs:
            return
        mtp_inputs = self.runner.prepare(seqs, starts, counts, tokens)
        out = self.runner.forward_mtp(mtp_inputs, hidden[torch.tensor(rows, device=hidden.device)])
        # draft only for live greedy sequences whose last fed token is their newest (prompt complete)
        drafting = [(j, seq) for j, seq in enumerate(seqs) if self.may_draft(seq)]
        if not drafting:
            return
        last_rows = [mtp_inputs.query_starts[j] + counts[j] - 1 for j, _ in drafting]
        h = out[torch.tensor(last_rows, device=out.device)]
        chain = [seq for _, seq in drafting]
        for seq in chain:
            seq.draft_token_ids = []
        for depth in range(self.k):
            logits = apply_processors(self.runner.logits(h), chain,
                                      [seq.output_token_ids + seq.draft_token_ids for seq in chain])
            drafts = logits.max(dim=-1).indices.tolist()
            for seq, d in zip(chain, drafts):
                seq.draft_token_ids.append(d)
            if depth + 1 == self.k:
                break
            # chain: MTP at the next position, fed its own output and the draft just made
            positions = [len(seq.token_ids) - 1 + depth for seq in chain]
            step_inputs = self.runner.prepare(chain, positions, [1] * len(chain), [[d] for d in drafts])
            h = self.runner.forward_mtp(step_inputs, h)


def verify_and_draft(runner, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                     ctx_slots: torch.Tensor, k: int) -> torch.Tensor:
    """One whole speculative cycle as a static forward (no host sync, no data-dependent shape): what a compiled
    step or a CUDA graph runs in one call. Each of the S sequences feeds Q = k + 1 rows, [last token, k drafts],
    in the padded layout (ctx_slots [S, T] must reach k - 1 positions past the last draft).

        verify   the main model over the Q rows; its greedy choice at each row is the target
        accept   a = the drafts that equal their targets, in order (the first mismatch stops it)
        MTP      the MTP layer over the same Q rows, fed the targets as next tokens: for rows 0..a the target
                 is the token that now follows (the accepted draft, then the bonus token), so those rows fill
                 the MTP cache exactly as after a step without drafts; rows past a write cache rows that the
                 next cycle overwrites before any query can see them
        draft    row a's output drafts the token after the bonus; k - 1 chained MTP steps (positions p + a + 1
                 onward, each fed the draft before it) make the rest

    -> int64 [S, 2k + 2]: the targets [S, k + 1] | a [S, 1] | the next drafts [S, k]. The caller accepts
    targets[:a] + [targets[a]] exactly as `accept_drafts` does, so greedy output is that of plain decoding."""
    S, T = ctx_slots.shape
    Q = k + 1
    inputs = static_step_inputs(ids, positions, slots, ctx_slots, runner.index_topk)
    hidden = runner.forward(inputs)  # [S * Q, H]
    targets = runner.logits(hidden).argmax(-1)  # [S * Q]
    grid = targets.view(S, Q)
    accepted = (ids.view(S, Q)[:, 1:] == grid[:, :k]).long().cumprod(1).sum(1)  # [S]
    mtp_inputs = dataclasses.replace(inputs, input_ids=targets)  # same rows: same mask and RoPE matrices
    out = runner.forward_mtp(mtp_inputs, hidden).view(S, Q, -1)
    seq_rows = torch.arange(S, device=ids.device)
    h = out[seq_rows, accepted]  # [S, H]
    position = positions.view(S, Q)[:, 0] + accepted  # of the bonus token's predecessor
    drafts = []
    for depth in range(k):
        token = runner.logits(h).argmax(-1)  # [S]
        drafts.append(token)
        if depth + 1 == k:
            break
        position = position + 1
        chain = static_step_inputs(token, position, ctx_slots.gather(1, position.view(S, 1)).view(S), ctx_slots,
                                   runner.index_topk)
        h = runner.forward_mtp(chain, h)
    return torch.cat([grid, accepted.view(S, 1), torch.stack(drafts, 1)], 1)
