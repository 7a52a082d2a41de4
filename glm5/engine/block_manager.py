"""Paged KV blocks: which cache slots each sequence owns, and prefix reuse by block hashing.

The latent cache is cut into blocks of `block_size` token slots. A sequence's `block_table` lists its blocks in
order, so position p lives in slot `block_table[p // block_size] * block_size + p % block_size`.

Prefix reuse: a full block is identified by the hash of (previous block's hash, its tokens). When a new
request starts, its leading full blocks are looked up and shared (reference counted) instead of recomputed.
A freed block keeps its contents and hash until it is handed out again (least recently freed first), so a
prompt seen a while ago can still hit.
"""

from __future__ import annotations

from collections import OrderedDict

from glm5.engine.sequence import Sequence


class NoFreeBlocks(RuntimeError):
    """The cache is full (the scheduler preempts instead of letting this escape)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks}, block_size={block_size}: both must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        # over the manager's life, counted when a waiting sequence is admitted (the scheduler), not per lookup:
        self.prefix_hits = 0  # tokens served from the prefix cache
        self.prefix_queries = 0  # tokens of the admitted sequences

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: after the model's weights change, no cached latent matches them. Blocks
        that running sequences hold stay theirs, but are no longer found by a prefix lookup."""
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks
        self.block_tokens = [None] * self.num_blocks

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that positions [0, num_tokens) of `seq` have slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free_blocks)

    # ------------------------------------------------------------------ allocation
    def _take_free_block(self) -> int:
        if not self.free_blocks:
            raise NoFreeBlocks("no free KV cache blocks")
        block, _ = self.free_blocks.popitem(last=False)
        old = self.block_hash[block]
        if old is not None and self.hash_to_block.get(old) == block:
            del self.hash_to_block[old]  # its cached contents are about to be overwritten
        self.block_hash[block] = None
        self.block_tokens[block] = None
        self.ref_count[block] = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` slots for positions [0, num_tokens)."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free_blocks):
            raise NoFreeBlocks(f"need {need} blocks, {len(self.free_blocks)} free")
        for _ in range(need):
            seq.block_table.append(self._take_free_block())

    @staticmethod
    def _hash(prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def match_prefix(self, seq: Sequence) -> int:
        """Share the cached blocks of the longest cached prefix of a fresh sequence; returns the tokens reused.

        The last token is always left to compute (its logits start the generation)."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        bs = self.block_size
        prev = None
        reused = 0
        full = (len(seq.token_ids) - 1) // bs
        for i in range(full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self._hash(prev, tokens)
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            if self.ref_count[block] == 0:
                del self.free_blocks[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            prev = h
            reused += bs
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = reused
        if not seq.num_preemptions:  # a resumed request keeps what its first admission reused (its prompt's)
            seq.num_cached_prefix_tokens = reused
        return reused

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly completed full blocks (all of whose tokens are computed)."""
        bs = self.block_size
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        prev = self.block_hash[seq.block_table[seq.num_hashed_blocks - 1]] if seq.num_hashed_blocks else None
        if seq.num_hashed_blocks and prev is None:
            # reset_prefix_cache() cut this sequence's chain (a held block's hash is None only after one): a
            # chain restarted at None would register its later blocks as a prompt's first ones, and their
            # latents depend on the old weights; so this sequence registers nothing more
            seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)
            return
        for i in range(seq.num_hashed_blocks, full):
            block = seq.block_table[i]
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self._hash(prev, tokens)
            self.block_hash[block] = h
            self.block_tokens[block] = tokens
            self.hash_to_block.setdefault(h, block)
            prev = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (reverse order, so a prefix's tail is evicted before its head)."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
