"""One loading path for every checkpoint glm5 writes, chosen by config.json's `quantization_config`.

    from glm5.quant.load import load_any_checkpoint
    model = load_any_checkpoint("runs/demo/model")      # bf16 / fp32
    model = load_any_checkpoint("out-fp8/")             # FP8Linear / FP8Experts (glm5.quant.fp8)
    model = load_any_checkpoint("out-int4/")            # QuantLinear / QuantExperts (glm5.quant.lowbit_model)

The engine (`LLM.from_pretrained`) and `glm5 serve --model` call it, so a quantized directory serves as it is.
"""

from __future__ import annotations

import torch
from torch import nn

METHODS = ("glm5-int4", "glm5-q2mix", "glm5-ternary")  # glm5.quant.lowbit_model.METHODS


def config_quant_method(cfg) -> str | None:
    """A GLM5Config's quantization_config.quant_method (None: full precision)."""
    return (cfg.extra.get("quantization_config") or {}).get("quant_method")


def quant_method(directory) -> str | None:
    """config.json's quantization_config.quant_method of a checkpoint directory (None: full precision)."""
    from glm5.config import GLM5Config

    return config_quant_method(GLM5Config.from_pretrained(directory))


def load_any_checkpoint(directory: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        attn_impl: str = "sparse") -> nn.Module:
    """One loading path for every checkpoint glm5 writes: dispatch on config.json's quantization_config
    (none: GLM5ForCausalLM.from_pretrained; "fp8": load_fp8_model; glm5-int4 / glm5-q2mix / glm5-ternary:
    load_quantized_model)."""
    from glm5.model.transformer import GLM5ForCausalLM

    method = quant_method(directory)
    if method is None:
        return GLM5ForCausalLM.from_pretrained(directory, device=device, dtype=dtype, attn_impl=attn_impl)
    if method == "fp8":
        from glm5.quant.fp8 import load_fp8_model

        return load_fp8_model(directory, device=device, dtype=dtype, attn_impl=attn_impl)
    if method in METHODS:
        from glm5.quant.lowbit_model import load_quantized_model

        return load_quantized_model(directory, device=device, dtype=dtype, attn_impl=attn_impl)
    raise ValueError(f"{directory}: unknown quantization_config.quant_method {method!r} (known: fp8, {', '.join(METHODS)})")
