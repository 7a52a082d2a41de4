"""The GLM-5 model (`glm_moe_dsa`): single-device, imports only torch and glm5.config.

    layers.py       RMSNorm, interleaved RoPE (default, yarn), SwiGLU MLP
    indexer.py      the lightning indexer, its scores and top-k selection (every path, one dispatcher)
    dsa.py          sparse latent attention over the selected tokens
    experts.py      the routed experts in every form, one dispatcher
    mla.py          Multi-head Latent Attention with the two attention paths
    moe.py          router, grouped experts, shared expert
    transformer.py  decoder layer, MTP layer, GLM5Model, GLM5ForCausalLM
"""

from glm5.model.transformer import CausalLMOutput, GLM5ForCausalLM, GLM5Model

__all__ = ["CausalLMOutput", "GLM5ForCausalLM", "GLM5Model"]
