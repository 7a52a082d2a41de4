"""The latent KV cache: what MLA + DSA keep per token, never expanded per head.

Per layer and token slot: the normed latent (kv_lora_rank) and the roped shared key (qk_rope_head_dim)
side by side, 576 values for GLM-5; and for layers with an indexer, the indexer's key (index_head_dim,
128 for GLM-5). Layers after the main stack hold the MTP layers' caches (speculative decoding).

    latent[layer]       [num_blocks * block_size + 1, kv_lora_rank + qk_rope_head_dim]
    index_keys[layer]   [num_blocks * block_size + 1, index_head_dim]   (None for IndexShare "shared" layers)

The last slot is scratch (`scratch_slot`), outside every block.
"""

from __future__ import annotations

import torch

from glm5.config import GLM5Config


def bytes_per_token(cfg: GLM5Config, dtype: torch.dtype, num_mtp_layers: int = 0) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    indexers = sum(cfg.has_indexer(i) for i in range(cfg.num_hidden_layers)) + num_mtp_layers
    return size * (per_layer * (cfg.num_hidden_layers + num_mtp_layers) + cfg.index_head_dim * indexers)


class LatentKVCache:
    def __init__(
        self, cfg: GLM5Config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str,
        num_mtp_layers: int = 0,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        num_slots = num_blocks * block_size
        # one slot past the managed blocks, never handed out: the padding rows of a CUDA-graph decode step
        # (glm5/engine/cuda_graphs.py) write there and read only it
        self.scratch_slot = num_slots
        num_slots += 1
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        n = cfg.num_hidden_layers + num_mtp_layers
        has_indexer = [cfg.has_indexer(i) for i in range(cfg.num_hidden_layers)] + [True] * num_mtp_layers
        self.latent = [torch.zeros(num_slots, width, dtype=dtype, device=device) for _ in range(n)]
        self.index_keys = [
            torch.zeros(num_slots, cfg.index_head_dim, dtype=dtype, device=device) if has else None
            for has in has_indexer
        ]
        self.bytes_per_token = bytes_per_token(cfg, dtype, num_mtp_layers)
