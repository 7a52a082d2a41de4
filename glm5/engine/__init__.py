"""Inference engine on token ids: paged latent KV cache, sparse DSA decode, continuous batching, MTP drafts.

    sequence.py       SamplingParams, Sequence
    block_manager.py  paged blocks, prefix reuse by block hashing
    kv_cache.py       the latent cache (576 + 128 values per token per layer for GLM-5)
    scheduler.py      prefill / decode steps, chunked prefill, token budget, preemption
    runner.py         one forward over the paged cache (absorbed MLA, sparse DSA)
    sampler.py        greedy, temperature, top-k/p, min-p, penalties, seeds, logprobs
    speculative.py    MTP drafting and greedy verification
    cuda_graphs.py    StepGraphs: steps replayed from captured CUDA graphs (bucketed shapes, static forward)
    llm.py            LLMEngine (alias LLM): generate() and the step-wise API
"""

from glm5.engine.llm import LLM, Completion, LLMEngine, StepOutput
from glm5.engine.sequence import SamplingParams

__all__ = ["LLM", "Completion", "LLMEngine", "SamplingParams", "StepOutput"]
