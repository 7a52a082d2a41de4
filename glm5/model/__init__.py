"""The GLM-5 model (`glm_moe_dsa`): single-device, imports only torch and glm5.config.

    layers.py       RMSNorm, interleaved RoPE (default, yarn), SwiGLU MLP
    dsa.py          lightning indexer, top-k selection (reference / block-wise), sparse latent attention
    mla.py          Multi-head Latent Attention with the two attention paths
    moe.py          router, grouped experts, shared expert
    transformer.py  decoder layer, MTP layer, GLM5Model, GLM5ForCausalLM
"""

from glm5.model.transformer import CausalLMOutput, GLM5ForCausalLM, GLM5Model

__all__ = ["CausalLMOutput", "GLM5ForCausalLM", "GLM5Model"]
