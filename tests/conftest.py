"""Shared fixtures: tiny random GLM-5 configs and a transformers twin with the same weights."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# the CPU kernels run wherever they can, whichever path the startup timing check would pick on this machine:
# every test sees the same code paths (tests/test_kernels.py tests the check itself)
os.environ.setdefault("GLM5_KERNEL_CHECK", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that every path matters (init std 0.02 makes logits nearly constant)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("norm" in name or "layernorm" in name):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(std * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def tiny_config(**overrides):
    from glm5 import GLM5Config

    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, index_topk=16, index_n_heads=8, index_head_dim=16, max_position_embeddings=1024,
        rope_theta=10000.0, pad_token_id=None, bos_token_id=None, eos_token_id=None, torch_dtype="float32",
    )
    base.update(overrides)
    return GLM5Config(**base)


def transformers_twin(model, attn_implementation: str = "eager"):
    """transformers' GlmMoeDsaForCausalLM with `model`'s weights (ours -> transformers)."""
    from transformers import GlmMoeDsaForCausalLM

    from glm5.checkpoint import to_transformers_config

    twin = GlmMoeDsaForCausalLM(to_transformers_config(model.config, attn_implementation)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return twin


def greedy_difference(model, prompt: list[int], got: list[int], expected: list[int], rel: float = 1e-4) -> str | None:
    """None when two greedy continuations of `prompt` agree, up to a near tie: paths that sum in a different order
    (a paged cache, another matmul blocking, another CPU) may round two logits within ~1e-6 of each other the
    other way, and after such a step the continuations rightly part. So at the first difference the two chosen
    tokens' logits (from `model`'s full forward) must be within `rel` of the logits' scale; else a message."""
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    if at is None:
        return None if len(got) == len(expected) else f"lengths {len(got)} vs {len(expected)}"
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + expected[:at]])).logits[0, -1].float()
    gap = abs(logits[got[at]] - logits[expected[at]]).item()
    scale = logits.abs().max().item()
    if gap <= rel * max(scale, 1.0):
        return None
    return f"first difference at new token {at}: {got[at]} vs {expected[at]}, logits {gap:.3g} apart (scale {scale:.3g}): {got} vs {expected}"


def train_cli_setup(base):
    """A folder for `glm5 train` tests: a 320-id tokenizer (tok/), a tiny config (cfg/) and data.jsonl of code text."""
    import json

    from glm5.tokenizer import train_tokenizer

    text = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)]
    tokenizer = train_tokenizer(iter(text), 320, out_dir=base / "tok")
    tiny_config(vocab_size=tokenizer.vocab_size, index_topk=8, max_position_embeddings=64).save_pretrained(base / "cfg")
    with open(base / "data.jsonl", "w") as fh:
        for i in range(0, 400, 4):
            fh.write(json.dumps({"text": "".join(text[i : i + 4])}) + "\n")
    return base


def drafting_model(scale: float = 30.0, seed: int = 0):
    """A random tiny model with an MTP layer whose drafts are often, not always, right: the embeddings are scaled
    up so a token's prediction depends mostly on the token itself, and the MTP layer passes the next token's
    embedding through (eh_proj [I | 0], its attention and experts damped), so it predicts what the main model
    will predict one position on. Speculation then accepts some drafts, all of them, or none."""
    from glm5 import GLM5ForCausalLM

    torch.manual_seed(seed)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_n_heads=16)), seed=seed).eval()
    hidden = model.config.hidden_size
    mtp = model.mtp[0]
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(scale)
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :hidden] = torch.eye(hidden)
        mtp.self_attn.o_proj.weight.mul_(0.1)
        for name, p in mtp.mlp.named_parameters():
            if "down" in name:
                p.mul_(0.1)
    return model
