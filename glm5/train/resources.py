"""Will a training run fit? A memory estimate checked before any work starts.

    check_fits_memory(cfg, batch_size=8, seq_len=256)   # ValueError with the estimate when it cannot fit

The estimate: fp32 weights, gradients and two AdamW moments (16 bytes per parameter) plus activations
(~24 hidden-sized values per token per layer kept for backward, the logits of the LM and MTP heads three
times over, and the T x T indexer/attention scores of the DSA stages). Rough, but it stops a config that is
orders of magnitude too big (a 744B model on a laptop) with a clear message instead of an OOM kill.
"""

from __future__ import annotations

from glm5.common import available_memory_bytes  # noqa: F401  (its home is glm5.common: serving uses it too)


def estimate_training_bytes(cfg, batch_size: int, seq_len: int) -> int:
    from glm5.params import count_parameters

    params = count_parameters(cfg)["total_params"]
    tokens = batch_size * seq_len
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    activations = tokens * layers * cfg.hidden_size * 24 * 4
    logits = tokens * cfg.vocab_size * 4 * 3 * (1 + cfg.num_nextn_predict_layers)
    scores = batch_size * seq_len * seq_len * (cfg.num_attention_heads + 2) * 4 * 2 * layers
    return 16 * params + activations + logits + scores


def check_fits_memory(cfg, batch_size: int, seq_len: int, available: int | None = None, device=None) -> None:
    """`batch_size`: the rows of one forward (a micro-batch); `device`: where training runs (its free memory)."""
    need = estimate_training_bytes(cfg, batch_size, seq_len)
    have = available_memory_bytes(device) if available is None else available
    if need > have:
        raise ValueError(f"this config cannot fit in memory: training needs about {need / 2**30:,.1f} GiB "
                         f"(weights, gradients, AdamW state, activations for {batch_size} x {seq_len} tokens), "
                         f"{have / 2**30:,.1f} GiB is available; use a smaller preset, batch or sequence")
