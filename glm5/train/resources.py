"""Will a training run fit, and run at the speed its settings promise? Checked before any work starts.

    check_fits_memory(cfg, batch_size=8, seq_len=256)   # ValueError with the estimate when it cannot fit
    check_dtype_speed("bfloat16", torch.device("cpu"))  # ValueError on a CPU where bf16 is emulated

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


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU: AVX-512 (with or without AVX512-BF16), AMX, or
    ARM's BF16. It honours ONEDNN_MAX_CPU_ISA, so an AVX2 cap reads as an AVX2 CPU."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: bf16 matmuls are the generic loops
        return False


def check_dtype_speed(dtype: str, device) -> None:
    """bf16 on a CPU without native bf16 (AVX2-only x86, ARM without BF16) is emulated and several times slower
    than fp32 (a tiny-bench training step there did not finish in 10 minutes where fp32 took 2.3 s): refuse it."""
    import torch

    if dtype == "bfloat16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        raise ValueError("--dtype bfloat16: this CPU has no native bf16 matmuls (oneDNN reports none: no AVX-512, "
                         "AMX or ARM BF16), so bf16 would run emulated, several times slower than float32; "
                         "use --dtype float32")
