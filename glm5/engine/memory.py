"""Will the engine fit? The memory a model needs to serve, checked before any weight is allocated.

    check_fits_serving(cfg, EngineConfig(kv_cache_tokens=32768), dtype_bytes=2, device="cuda")

The estimate: every weight at `dtype_bytes` (the MTP layer's included) plus the latent KV cache
(engine/kv_cache.py's bytes per token times the cache's tokens). Activations of a step are small next to
these. It stops `glm5 serve --preset glm5-744b` on a machine without 1.5 TB with one clear line instead of an
allocation failure deep in torch.
"""

from __future__ import annotations


def estimate_serving_bytes(cfg, engine_config, dtype_bytes: int) -> int:
    import torch

    from glm5.engine.kv_cache import bytes_per_token
    from glm5.params import count_parameters

    counts = count_parameters(cfg)
    params = counts["total_params"] + counts["mtp_params"]  # the MTP layer is built whenever the config has one
    dtype = {4: torch.float32, 2: torch.bfloat16, 1: torch.uint8}[dtype_bytes]
    num_mtp = 1 if engine_config.num_speculative_tokens else 0
    kv = bytes_per_token(cfg, dtype, num_mtp) * engine_config.num_blocks * engine_config.block_size
    return params * dtype_bytes + kv


def check_fits_serving(cfg, engine_config, dtype_bytes: int, device=None, available: int | None = None) -> None:
    """ValueError with the estimate when the model and its KV cache cannot fit on `device`."""
    from glm5.common import available_memory_bytes

    need = estimate_serving_bytes(cfg, engine_config, dtype_bytes)
    have = available_memory_bytes(device) if available is None else available
    if need > have:
        raise ValueError(f"this config cannot fit in memory: serving needs about {need / 2**30:,.1f} GiB "
                         f"(weights at {dtype_bytes} bytes per parameter, a KV cache of "
                         f"{engine_config.kv_cache_tokens:,} tokens), {have / 2**30:,.1f} GiB is available; use a "
                         f"smaller preset, --dtype bfloat16, an FP8 checkpoint or fewer --kv-cache-tokens")
