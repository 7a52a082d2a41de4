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
"""

from __future__ import annotations

import torch

from glm5.engine.block_manager import BlockManager
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


def can_speculate(seq) -> bool:
    p = seq.params
    return (p.greedy and not p.has_penalties and p.logprobs is None
            and all(getattr(processor, "stateless", False) for processor in p.logits_processors))


class MTPDrafter:
    def __init__(self, runner, block_manager: BlockManager, num_speculative_tokens: int) -> None:
        self.runner = runner
        self.block_manager = block_manager
        self.k = num_speculative_tokens

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
        drafting = []
        for j, seq in enumerate(seqs):  # check and take the blocks together: earlier drafters use up free ones
            if (seq.finish_reason is None and can_speculate(seq) and seq.num_pending_tokens == 1
                    and self.block_manager.can_allocate(seq, len(seq.token_ids) + 2 * self.k)):
                self.block_manager.allocate(seq, len(seq.token_ids) + 2 * self.k)
                drafting.append((j, seq))
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
