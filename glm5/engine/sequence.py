"""A request inside the engine: its token ids, where its KV cache lives, how to sample it, when it stops.

The engine works on token ids only; text (stop strings, detokenization) is the server's business.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI: subtract once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL / HF / vLLM: divide positive logits (prompt + output tokens)
    seed: int | None = None  # same seed, same prompt -> same tokens
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the n most likely
    # callables (output token ids, logits [V]) -> logits, applied first (constrained decoding, e.g. JSON mode)
    logits_processors: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be a positive integer")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r}: must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}: must be > 0")
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs={self.logprobs!r}: must be in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5  # as vLLM: a smaller temperature overflows logits / T into NaN

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


_ids = itertools.count()


class Sequence:
    """One request. token_ids = prompt + output so far; the first `num_computed_tokens` are in the KV cache."""

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else f"seq-{self.seq_id}"
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose latent KV is written in the cache
        self.num_cached_prefix_tokens = 0  # of those, how many came from the prefix cache
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.logprobs: list[TokenLogprob] = []
        self.draft_token_ids: list[int] = []  # MTP drafts awaiting verification (not in token_ids)
        self.num_drafted = 0
        self.num_accepted = 0
        self.num_preemptions = 0
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens not yet in the KV cache (a prompt's remainder, or the last sampled token)."""
        return len(self.token_ids) - self.num_computed_tokens
