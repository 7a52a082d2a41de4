"""glm5: the GLM-5 system end to end in one hackable codebase.

    import glm5
    cfg = glm5.GLM5Config.from_preset("nano")
    model = glm5.GLM5ForCausalLM(cfg)
    logits = model(input_ids).logits            # [batch, seq, vocab]

Importing the package has no side effects; heavy submodules load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "GLM5Config": "glm5.config",
    "PRESETS": "glm5.config",
    "GLM5ForCausalLM": "glm5.model.transformer",
    "GLM5Model": "glm5.model.transformer",
    "count_parameters": "glm5.params",
    "Tokenizer": "glm5.tokenizer",
    "default_tokenizer": "glm5.tokenizer",
    "render_messages": "glm5.chat",
    "parse_output": "glm5.chat",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glm5' has no attribute {name!r}")
