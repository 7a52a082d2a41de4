"""Building blocks shared by the GLM-5 model: RMSNorm, interleaved RoPE (default and yarn), the SwiGLU MLP.

Numerics follow transformers' glm_moe_dsa exactly (norms computed in fp32, cos/sin cast to the activation dtype).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glm5.config import GLM5Config
from glm5.kernels import rms_norm, swiglu, swiglu_runs
from glm5.kernels.build import grad_wanted
from glm5.kernels.check import kernel_or_fallback, size_class


def no_autograd(*tensors: torch.Tensor) -> bool:
    """True when none of tensors is recorded by autograd, so an op may overwrite its (fresh) input in place.

    Inference reuses memory this way: at 8K tokens a new [T, intermediate] tensor is a fresh mmap whose pages
    fault in on first touch (glibc hands blocks above 32 MB straight back to the OS), which made the
    out-of-place SwiGLU 1.6x slower than the same math in place (dev/LOG.md)."""
    return not grad_wanted(*tensors)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32:
            # the CPU fp32 kernel (glm5.kernels) where it beats the PyTorch code below on this machine
            shape_class = (size_class(x.numel() // max(1, x.shape[-1])), x.shape[-1], grad_wanted(x, self.weight))
            return kernel_or_fallback("rms_norm", shape_class, lambda: rms_norm(x, self.weight, self.eps),
                                      lambda: self._torch_forward(x))
        return self._torch_forward(x)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: GLM5Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies over the qk_rope_head_dim rotary dims, and the cos/sin scale (1.0 unless yarn)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if cfg.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    # yarn (as DeepSeek-V3 and transformers compute it)
    p = cfg.rope_scaling
    factor = p.get("factor")
    orig_max = p.get("original_max_position_embeddings", cfg.max_position_embeddings)
    if factor is None:
        factor = cfg.max_position_embeddings / orig_max

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin per position for the rope dims; half-width (one angle per rotated pair)."""

    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.cfg = cfg
        inv_freq, self.attention_scaling = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset(self) -> None:
        """Recompute inv_freq in place (after `to_empty`, which leaves buffers uninitialized)."""
        inv_freq, self.attention_scaling = rope_inv_freq(self.cfg)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, T] -> cos, sin [B, T, rope_dim/2]
        freqs = position_ids[..., None].float() * self.inv_freq.float().to(position_ids.device)
        cos = (freqs.cos() * self.attention_scaling).to(dtype)
        sin = (freqs.sin() * self.attention_scaling).to(dtype)
        return cos, sin


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1), (x2, x3)... of the last dim; the output is de-interleaved
    ([all first elements | all second elements]), the layout the released weights expect.

    x [..., T, (heads,) D]; cos/sin [B, T, D/2] broadcast over any head dim placed after T.
    """
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    complex_view_ok = x.stride(-1) == 1 and x.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in x.stride()[:-1])
    if x.dtype == torch.float32 and cos.dtype == torch.float32 and complex_view_ok and x.device.type == "cpu":
        # the same products as one complex multiply (x1 + i x2)(cos + i sin), and one copy to de-interleave:
        # 30% less time forward + backward than four real products and a cat, the same numbers in fp32
        pairs = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.complex(cos, sin))
        return pairs.transpose(-1, -2).flatten(-2)
    # unbind, not strided slices: its backward is one stack, a slice's would zero-fill a full-size gradient
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not no_autograd(x, self.gate_proj.weight, self.up_proj.weight)
                and not torch.is_autocast_enabled(x.device.type) and swiglu_runs(x, self.gate_proj.weight)):
            # training: one matmul for gate and up, then the CPU SwiGLU kernel (glm5.kernels), whose backward
            # is one pass and one tensor (inference is faster in place below: no new [T, 2I] output), where it
            # beats the PyTorch code on this machine
            shape_class = (size_class(x.numel() // x.shape[-1]), x.shape[-1], self.gate_proj.out_features)
            return kernel_or_fallback("swiglu_mlp", shape_class, lambda: self._fused_forward(x),
                                      lambda: self._torch_forward(x))
        return self._torch_forward(x)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        gate_up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        hidden = swiglu(gate_up)
        return None if hidden is None else self.down_proj(hidden)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if no_autograd(gate, up):
            return self.down_proj(F.silu(gate, inplace=True).mul_(up))
        return self.down_proj(F.silu(gate) * up)
