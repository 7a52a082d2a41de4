"""Inference engine on token ids: paged latent KV cache, sparse DSA decode, continuous batching, MTP drafts.

    sequence.py       SamplingParams, Sequence
    block_manager.py  paged blocks, prefix reuse by block hashing
    kv_cache.py       the latent cache (576 + 128 values per token per layer for GLM-5)
    scheduler.py      prefill / decode steps, chunked prefill, token budget, preemption
    runner.py         one forward over the paged cache (absorbed MLA, sparse DSA)
    sampler.py        greedy, temperature, top-k/p, min-p, penalties, seeds, logprobs
    speculative.py    MTP drafting and greedy verification
    cuda_graphs.py    StepGraphs: steps replayed from captured CUDA graphs (bucketed shapes, static forward)
    config.py         EngineConfig: every engine knob (cache, batch, speculation, graphs, device, dtype)
    llm.py            LLMEngine (alias LLM): generate() and the step-wise API
"""

from glm5.engine.config import EngineConfig

__all__ = ["LLM", "Completion", "EngineConfig", "LLMEngine", "SamplingParams", "StepOutput"]
_LAZY = {"LLM": "glm5.engine.llm", "Completion": "glm5.engine.llm", "LLMEngine": "glm5.engine.llm",
         "StepOutput": "glm5.engine.llm", "SamplingParams": "glm5.engine.sequence"}


def __getattr__(name: str):
    # torch is imported on first use, not by `import glm5.engine.config` (the CLI's flags need only the config)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glm5.engine' has no attribute {name!r}")
