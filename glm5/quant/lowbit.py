"""Low-bit weight arithmetic: integer groups (2/3/4/8 bits), GPTQ, ternary {-1, 0, +1}, and their bit packing.

    from glm5.quant.lowbit import quantize_rtn, quantize_gptq, quantize_ternary, dequantize, QuantizedWeight
    qw = quantize_rtn(w, bits=4, group_size=128, symmetric=False)   # w [..., out, in] -> packed codes + scales
    qw = quantize_gptq(w, hessian, bits=4)                          # the same format, error-compensated columns
    qw = quantize_ternary(w)                                        # BitNet b1.58 absmean, 5 weights per byte
    w_again = dequantize(qw, torch.float32)

Integer groups run along the input dimension (one scale, and one zero point when asymmetric, per `group_size`
inputs of one output row; a partial last group gets its own). Codes q are unsigned b-bit integers:
    symmetric   scale = max|w| / (2^(b-1) - 1), w ≈ (q - 2^(b-1)) · scale, q ∈ [1, 2^b - 1]
    asymmetric  scale = (max(w, 0) - min(w, 0)) / (2^b - 1), zero = round(-min / scale), w ≈ (q - zero) · scale
The scale is stored in float16, rounded UP from the exact one, so no weight clips and every weight moves by at
most scale/2 (`tests/test_lowbit.py` checks the bound). Packing: 8 codes of b bits -> b bytes, little-endian
within a 64-bit word (any b ≤ 8, 3 included), along the input dimension padded to a multiple of 8.

Ternary (BitNet b1.58, arXiv:2402.17764): scale = mean|W| over the whole matrix, W_q = clip(round(W / scale),
-1, 1); trits are stored as 0/1/2 and packed five per byte in base 3 (3^5 = 243 ≤ 256: 1.6 bits per weight, as
llama.cpp's TQ1_0), the scale as float32 per output row (all rows of a matrix equal).

GPTQ (Frantar et al., arXiv:2210.17323): columns are quantized in order; each column's rounding error, divided
by the diagonal of the upper Cholesky factor of H⁻¹, is pushed onto the columns not yet quantized, so the layer
output X·Wᵀ on the calibration inputs (H = XᵀX) moves less than round-to-nearest moves it. Blocks of
`group_size` columns (lazy batch updates), 1% dampening of the diagonal, group scales taken from the
error-updated weights when a group starts. No act-order (columns keep their order, so groups stay contiguous).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TERNARY = 0  # `bits` value that marks the ternary format (1.58 bits of information, 1.6 stored)
INT_BITS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZE = 128


@dataclass
class QuantizedWeight:
    """A packed weight [..., out, in]: codes [..., out, packed], scales [..., out, groups], zeros or None."""

    qweight: torch.Tensor  # uint8
    scales: torch.Tensor  # float16 (int) / float32 (ternary)
    qzeros: torch.Tensor | None  # uint8 [..., out, groups]; None when symmetric or ternary
    bits: int  # 2, 3, 4, 8 or TERNARY
    group_size: int  # inputs per scale (ternary: the whole row)
    in_features: int

    @property
    def symmetric(self) -> bool:
        return self.qzeros is None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.qzeros) if t is not None)


def bits_per_weight(bits: int, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = False) -> float:
    """Stored bits per weight of a format, scales and zero points included (what the q2 mix budgets)."""
    if bits == TERNARY:
        return 8 / 5
    return bits + (16 + (0 if symmetric else 8)) / group_size


# ---------------------------------------------------------------------------------------------- packing
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., n] (integers in [0, 2^bits)) -> uint8 [..., ceil(n/8) * bits]: 8 codes per `bits` bytes."""
    if bits not in range(1, 9):
        raise ValueError(f"pack_bits: bits={bits} must be in 1..8")
    *lead, n = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, (-n) % 8)).reshape(*lead, -1, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (padded << shifts).sum(-1)  # [..., n/8] holding 8·bits ≤ 64 bits (disjoint fields: sum = or)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((words[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, -1)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [..., ceil(n/8) * bits] -> uint8 codes [..., n]."""
    *lead, width = packed.shape
    if width != math.ceil(n / 8) * bits:
        raise ValueError(f"unpack_bits: {width} bytes cannot hold {n} codes of {bits} bits")
    groups = packed.to(torch.int64).reshape(*lead, -1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (groups << byte_shifts).sum(-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (words[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8)


_POW3 = (1, 3, 9, 27, 81)


def pack_ternary(trits: torch.Tensor) -> torch.Tensor:
    """trits [..., n] in {0, 1, 2} -> uint8 [..., ceil(n/5)], five per byte in base 3 (first trit least significant)."""
    *lead, n = trits.shape
    padded = torch.nn.functional.pad(trits.to(torch.int32), (0, (-n) % 5)).reshape(*lead, -1, 5)
    weights = torch.tensor(_POW3, dtype=torch.int32, device=trits.device)
    return (padded * weights).sum(-1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_ternary -> uint8 trits [..., n] in {0, 1, 2}."""
    *lead, width = packed.shape
    if width != math.ceil(n / 5):
        raise ValueError(f"unpack_ternary: {width} bytes cannot hold {n} trits")
    weights = torch.tensor(_POW3, dtype=torch.int32, device=packed.device)
    trits = (packed.to(torch.int32)[..., None] // weights) % 3
    return trits.reshape(*lead, -1)[..., :n].to(torch.uint8)


# ---------------------------------------------------------------------------------------------- integer groups
def _check(weight: torch.Tensor, bits: int, group_size: int) -> None:
    if weight.ndim < 2 or not weight.is_floating_point():
        raise ValueError(f"need a float matrix [..., out, in], got {weight.dtype} {tuple(weight.shape)}")
    if bits not in INT_BITS:
        raise ValueError(f"bits={bits}: expected one of {INT_BITS}")
    if group_size < 1:
        raise ValueError(f"group_size={group_size}: must be >= 1")
    if not torch.isfinite(weight).all():
        raise ValueError("the weight holds inf or NaN")


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """x (fp32, > 0) -> the smallest float16 >= x, as fp32 (so scaling by it never pushes a weight out of range)."""
    h = x.to(torch.float16)
    low = h.float() < x
    h = torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., g] (one group per row of the last dim) -> (scale [...] fp32 exact in fp16, zero [...] fp32 integer)."""
    w = w.float()
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1) - 1
        amax = w.abs().amax(-1)
        scale = _round_up_fp16(torch.where(amax > 0, amax / half, torch.ones_like(amax)))
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)  # 0 inside the range: zero is a code
    span = hi - lo
    scale = _round_up_fp16(torch.where(span > 0, span / qmax, torch.ones_like(span)))
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w [..., g] with per-row scale / zero [...] -> codes [..., g] (float, integers in [0, 2^bits))."""
    return torch.clamp(torch.round(w.float() / scale[..., None]) + zero[..., None], 0, 2**bits - 1)


def _grouped(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    *lead, out, n = weight.shape
    groups = math.ceil(n / group_size)
    return torch.nn.functional.pad(weight.float(), (0, groups * group_size - n)).reshape(*lead, out, groups, group_size), groups


def _finish(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, n: int,
            symmetric: bool) -> QuantizedWeight:
    *lead, out, groups, g = codes.shape
    codes = codes.reshape(*lead, out, groups * g)[..., :n]
    return QuantizedWeight(pack_bits(codes, bits), scale.to(torch.float16),
                           None if symmetric else zero.to(torch.uint8), bits, group_size, n)


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE,
                 symmetric: bool = False) -> QuantizedWeight:
    """Round-to-nearest in groups along the input dimension. weight [..., out, in]."""
    _check(weight, bits, group_size)
    n = weight.shape[-1]
    # a partial last group is padded with zeros, which change neither max|w| nor the range once 0 is in it
    grouped, _ = _grouped(weight, group_size)
    scale, zero = group_params(grouped, bits, symmetric)
    codes = quantize_codes(grouped, scale, zero, bits)
    return _finish(codes, scale, zero, bits, group_size, n, symmetric)


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE,
                  symmetric: bool = False, damp: float = 0.01) -> QuantizedWeight:
    """GPTQ for one matrix weight [out, in] given H = Σ x xᵀ [in, in] of its calibration inputs."""
    _check(weight, bits, group_size)
    if weight.ndim != 2:
        raise ValueError(f"quantize_gptq: one matrix at a time, got {tuple(weight.shape)}")
    out, n = weight.shape
    if tuple(hessian.shape) != (n, n):
        raise ValueError(f"quantize_gptq: hessian {tuple(hessian.shape)} does not match {n} inputs")
    W = weight.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0  # inputs never seen: any value is free, set them to zero
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    groups = math.ceil(n / group_size)
    codes = torch.zeros(out, n, dtype=torch.float64)
    scales = torch.zeros(out, groups, dtype=torch.float32)
    zeros = torch.zeros(out, groups, dtype=torch.float32)
    for g, i1 in enumerate(range(0, n, group_size)):
        i2 = min(i1 + group_size, n)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        scale, zero = group_params(W1.float(), bits, symmetric)  # from the weights as updated so far
        scales[:, g], zeros[:, g] = scale, zero
        s, z = scale.double(), zero.double()
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)
            codes[:, i1 + i] = q
            e = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= e[:, None] * Hinv1[i, i:][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return QuantizedWeight(pack_bits(codes.to(torch.uint8), bits), scales.to(torch.float16),
                           None if symmetric else zeros.to(torch.uint8), bits, group_size, n)


# ---------------------------------------------------------------------------------------------- ternary
def absmean_ternary(weight: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., out, in] -> (trits in {-1, 0, 1} as float, scale [..., 1, 1] = mean|W| per matrix)."""
    scale = weight.abs().mean(dim=(-2, -1), keepdim=True).clamp(min=eps)
    return torch.clamp(torch.round(weight / scale), -1, 1), scale


def quantize_ternary(weight: torch.Tensor) -> QuantizedWeight:
    """BitNet b1.58: one absmean scale per matrix (weight [..., out, in]), trits packed five per byte."""
    if weight.ndim < 2 or not weight.is_floating_point() or not torch.isfinite(weight).all():
        raise ValueError(f"quantize_ternary: need a finite float matrix [..., out, in], got {weight.dtype} {tuple(weight.shape)}")
    trits, scale = absmean_ternary(weight.detach().float())
    scales = scale.expand(*weight.shape[:-1], 1).contiguous()  # one per row: all equal within a matrix
    return QuantizedWeight(pack_ternary((trits + 1).to(torch.uint8)), scales, None, TERNARY, weight.shape[-1],
                           weight.shape[-1])


# ---------------------------------------------------------------------------------------------- dequantize
def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed weight -> dense [..., out, in] in `dtype` (products in fp32, then one rounding to dtype)."""
    return dequantize_parts(qw.qweight, qw.scales, qw.qzeros, qw.bits, qw.group_size, qw.in_features, dtype)


def dequantize_parts(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int,
                     group_size: int, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if bits == TERNARY:
        trits = unpack_ternary(qweight, in_features).float() - 1
        return (trits * scales.float()).to(dtype)
    codes = unpack_bits(qweight, bits, in_features).float()
    *lead, out, n = codes.shape
    groups = scales.shape[-1]
    zero = qzeros.float() if qzeros is not None else torch.full_like(scales, 2 ** (bits - 1), dtype=torch.float32)
    padded = torch.nn.functional.pad(codes, (0, groups * group_size - n)).reshape(*lead, out, groups, group_size)
    w = (padded - zero[..., None]) * scales.float()[..., None]
    return w.reshape(*lead, out, groups * group_size)[..., :n].to(dtype)
